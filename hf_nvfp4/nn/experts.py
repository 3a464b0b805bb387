"""Mixture-of-experts modules: find them, plan them, mark them converted, run them.

transformers 5.x stores a model's routed experts as 3-D Parameters in one module (e.g.
``Qwen3MoeExperts.gate_up_proj`` [E, 2I, H]) whose forward dispatches through a registry of
implementations chosen by ``config._experts_implementation``. Such a module is recognised
by duck typing (3-D Parameters plus the layout flags the ``@use_experts_implementation``
decorator sets: ``has_gate``, ``has_bias``, ``is_transposed``), never by importing
transformers. Conversion leaves the module and its Parameters as they are (the state_dict
is unchanged), attaches an :class:`NVFP4Experts` record, and selects the ``"hf_nvfp4"``
implementation (registered with transformers by the integrations layer) on the experts' config.
That implementation calls :func:`experts_forward` for converted modules and the model's
previous implementation for the others (kept blocks, ``modules_to_not_convert``).

Two expert modules of transformers sit outside that interface and get a small adapter of our
own (:data:`ADAPTERS`, keyed by class name and checked by their parameters): JetMoE's
``JetMoeParallelExperts`` (a grouped linear, ``weight`` [E, N, K]) and Llama 4's
``Llama4TextExperts`` (every expert on its slice of pre-routed tokens, ``gate_up_proj`` [E, K, 2I],
``down_proj`` [E, I, K]). Conversion sets the module's ``forward`` (an instance attribute:
parameters and state_dict untouched); unconversion removes it.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import as_recipe
from ..ops.experts import quantized_dense_experts, quantized_experts, quantized_grouped_linear
from ..ops.linear import GemmPlan
from .convert import ON_CONVERT, ON_PLAN, ON_UNCONVERT, find_blocks, module_matches
from .fused import tracing
from .linear import NVFP4State

logger = logging.getLogger("hf_nvfp4")
EXPERTS_IMPLEMENTATION = "hf_nvfp4"
ROUTER_NAMES = ("gate", "router")
LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed")


@dataclass(eq=False)
class NVFP4Experts:
    """What conversion attaches to an experts module (a plain attribute, never state_dict).

    decision: ``"convert"`` or why the module stays in high precision; fallback: the experts
    implementation the model used before (run for unconverted modules and after a switch to
    bf16); state: the model's shared :class:`NVFP4State` (recipe, SR stream, precision switch)
    when converted.
    """

    decision: str
    fallback: str
    state: NVFP4State | None = None
    backend: str = "emulated"
    adapter: str | None = None  # the hf_nvfp4 adapter's name, for modules outside transformers' interface

    @property
    def converted(self) -> bool:
        return self.decision == "convert" and self.state is not None

    @property
    def precision(self) -> str:
        return self.state.precision if self.converted else "bf16"

    @property
    def forward_precision(self) -> str | None:
        return self.state.forward_precision if self.converted else None

    def plan(self, device: torch.device) -> GemmPlan:
        """The state's plan, as for a Linear. An expert's gate and up are one ``[2I, H]`` matrix,
        quantized as one tensor: they always share one weight tensor scale."""
        return self.state.plan(device)

    @property
    def high_precision(self) -> bool:
        """True when every GEMM runs in bf16 (unconverted, or switched late)."""
        return not self.converted or (self.precision == "bf16" and self.forward_precision in (None, "bf16"))


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def expert_params(mod: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own 3-D Parameters (empty for anything that is not an experts module).

    Convolutions (e.g. Mamba's depthwise conv1d, weight [C, 1, k]) are not matmuls.
    """
    if isinstance(mod, CONVS):
        return {}
    return {n: p for n, p in mod.named_parameters(recurse=False) if p.ndim == 3}


def uses_experts_interface(mod: nn.Module) -> bool:
    cfg = getattr(mod, "config", None)
    return all(isinstance(getattr(mod, f, None), bool) for f in LAYOUT_FLAGS) and hasattr(
        cfg, "_experts_implementation"
    )


def _jetmoe_forward(mod: nn.Module, inputs: torch.Tensor, expert_size) -> torch.Tensor:
    rec = mod.nvfp4_experts
    if rec.high_precision or tracing():
        return type(mod).forward(mod, inputs, expert_size)
    return quantized_grouped_linear(inputs, expert_size, mod.weight, rec.plan(inputs.device))


def _llama4_forward(mod: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    rec = mod.nvfp4_experts
    if rec.high_precision or tracing():
        return type(mod).forward(mod, hidden_states)
    n_experts, hidden = mod.gate_up_proj.shape[0], mod.gate_up_proj.shape[1]

    def swiglu(h):  # Llama4TextExperts.forward's gate: up * act(gate), [gate; up] along the output
        gate, up = h.chunk(2, dim=-1)
        return up * mod.act_fn(gate)

    x = hidden_states.view(n_experts, -1, hidden)
    return quantized_dense_experts(x, mod.gate_up_proj, mod.down_proj, swiglu, rec.plan(hidden_states.device),
                                   transposed=True)


# class name -> (adapter forward, the parameters it reads, whether they are stored [E, K, N])
ADAPTERS = {
    "JetMoeParallelExperts": (_jetmoe_forward, ("weight",), False),
    "Llama4TextExperts": (_llama4_forward, ("gate_up_proj", "down_proj"), True),
}


def adapter_for(mod: nn.Module) -> str | None:
    """The name of hf_nvfp4's adapter for ``mod`` (a module outside transformers' experts interface), or None."""
    entry = ADAPTERS.get(type(mod).__name__)
    if entry is None or uses_experts_interface(mod):
        return None
    if not all(isinstance(getattr(mod, p, None), torch.Tensor) and getattr(mod, p).ndim == 3 for p in entry[1]):
        return None
    if entry[0] is _llama4_forward and not callable(getattr(mod, "act_fn", None)):
        return None
    return type(mod).__name__


def expert_matrices(mod: nn.Module) -> tuple[tuple[int, int], ...]:
    """Per-expert (N, K) of the up (gate_up) and down projections, from the layout flags (adapters:
    of each 3-D parameter they read)."""
    name = adapter_for(mod)
    if name is not None:
        _, params, transposed = ADAPTERS[name]
        shapes = [getattr(mod, p).shape for p in params]
        return tuple((int(s[2]), int(s[1])) if transposed else (int(s[1]), int(s[2])) for s in shapes)
    up = getattr(mod, "gate_up_proj" if mod.has_gate else "up_proj")
    shapes = []
    for w in (up, mod.down_proj):
        n, k = (w.shape[2], w.shape[1]) if mod.is_transposed else (w.shape[1], w.shape[2])
        shapes.append((int(n), int(k)))
    return shapes[0], shapes[1]


def unsupported_reason(mod: nn.Module) -> str | None:
    """Why an experts module cannot run the NVFP4 path (None when it can)."""
    cls = type(mod).__name__
    if adapter_for(mod) is not None:
        return None
    if not uses_experts_interface(mod):
        return f"unsupported module type ({cls}: 3-D expert weights outside transformers' experts interface)"
    names = ["gate_up_proj" if mod.has_gate else "up_proj", "down_proj"]
    if mod.has_bias:
        names += [n + "_bias" for n in names]
    missing = [n for n in names if not isinstance(getattr(mod, n, None), torch.Tensor)]
    if missing:
        return f"unsupported module type ({cls}: layout flags name missing parameters {missing})"
    if not callable(getattr(mod, "_apply_gate" if mod.has_gate else "act_fn", None)):
        return f"unsupported module type ({cls}: no {'_apply_gate' if mod.has_gate else 'act_fn'})"
    if getattr(mod, "has_post_expert_norm", False) and not callable(getattr(mod, "post_expert_norm", None)):
        return f"unsupported module type ({cls}: has_post_expert_norm without post_expert_norm)"
    return None


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding 3-D expert Parameters, by name."""
    return {name: mod for name, mod in model.named_modules() if expert_params(mod)}


def _routers(model: nn.Module, experts: dict[str, nn.Module]) -> set[str]:
    """nn.Linear routers of an experts module: they stay high precision.

    A sibling named ``gate`` / ``router`` (e.g. ``mlp.gate``), or an nn.Linear inside such a
    sibling (e.g. AFMoE's ``mlp.router.gate``), with one output per expert.
    """
    modules = dict(model.named_modules())
    out = set()
    for name, mod in experts.items():
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        n_experts = getattr(mod, "num_experts", None)
        for r in ROUTER_NAMES:
            full = f"{parent}.{r}" if parent else r
            sib = modules.get(full)
            if sib is None:
                continue
            for sub, lin in sib.named_modules(prefix=full):
                if isinstance(lin, nn.Linear) and lin.out_features == n_experts:
                    out.add(sub)
    return out


def plan_experts(model: nn.Module, config=None, kept: set[int] | None = None) -> dict[str, str]:
    """Plan entries for experts modules (``"convert"`` or a reason) and ``"router"`` for Linear routers.

    Same rules, in the same order, as for Linear layers: modules_to_not_convert, BF16
    blocks (``kept``: ids of the modules inside them; found here when None), then what the
    module itself allows (layout, dims divisible by 16). Registered in ``ON_PLAN``, so
    :func:`~hf_nvfp4.nn.plan_conversion` includes these entries.
    """
    experts = find_experts(model)
    if not experts:
        return {}
    recipe = as_recipe(config)
    if kept is None:
        _, blocks = find_blocks(model)
        first, last = recipe.resolved_bf16_blocks(len(blocks))
        kept = set()
        for b in blocks[:first] + blocks[len(blocks) - last :]:
            kept |= {id(m) for m in b.modules()}
    plan = {name: "router" for name in _routers(model, experts)}
    for name, mod in experts.items():
        why = unsupported_reason(mod)
        if any(module_matches(name, p) for p in recipe.modules_to_not_convert):
            plan[name] = "modules_to_not_convert"
        elif id(mod) in kept:
            plan[name] = "bf16 block"
        elif why:
            plan[name] = why
        else:
            odd = [f"{n}x{k}" for n, k in expert_matrices(mod) if n % 16 or k % 16]
            plan[name] = f"shape {', '.join(odd)} not divisible by 16" if odd else "convert"
    return plan


def convert_experts(model: nn.Module, state: NVFP4State, plan: dict[str, str] | None = None) -> int:
    """Attach :class:`NVFP4Experts` to every interface experts module; select ``"hf_nvfp4"``.

    Runs in ``ON_CONVERT`` (every conversion). Returns the number of converted experts
    modules. The implementation is selected only on configs whose experts have at least one
    converted module; the previous one is kept as the fallback of every module.
    """
    plan = plan_experts(model, state.recipe) if plan is None else plan
    modules = dict(model.named_modules())
    found = [(n, modules[n]) for n in plan if n in modules and expert_params(modules[n])]
    found = [(n, m) for n, m in found if uses_experts_interface(m) or adapter_for(m)]
    configs: dict[int, object] = {}
    n = 0
    for name, mod in found:
        adapter = adapter_for(mod)
        if adapter is not None:  # our own forward, as an instance attribute; no transformers registry
            rec = NVFP4Experts(plan[name], "forward", state if plan[name] == "convert" else None, adapter=adapter)
            mod.nvfp4_experts = rec
            if rec.converted:
                mod.forward = types.MethodType(ADAPTERS[adapter][0], mod)
                state.register(mod)
                n += 1
            continue
        cfg = mod.config
        old = getattr(mod, "nvfp4_experts", None)
        fallback = cfg._experts_implementation
        if fallback == EXPERTS_IMPLEMENTATION or fallback is None:
            fallback = old.fallback if old is not None else "grouped_mm"
        rec = NVFP4Experts(plan[name], fallback, state if plan[name] == "convert" else None)
        if rec.converted:
            state.register(mod)  # set_precision on the state counts (and switches) it
            configs[id(cfg)] = cfg
            n += 1
        mod.nvfp4_experts = rec
    for cfg in configs.values():
        cfg._experts_implementation = EXPERTS_IMPLEMENTATION
    if n and any(getattr(m, "backend", None) == "te" for m in model.modules()):
        logger.info("hf_nvfp4: experts run on the emulated path (TE's GroupedLinear is not wired)")
    return n


def unconvert_experts(model: nn.Module) -> int:
    """Drop the records and restore each config's previous experts implementation (``ON_UNCONVERT``)."""
    n = 0
    for mod in model.modules():
        rec = mod.__dict__.pop("nvfp4_experts", None)
        if rec is None:
            continue
        n += rec.converted
        if rec.adapter is not None:
            mod.__dict__.pop("forward", None)
            continue
        cfg = getattr(mod, "config", None)
        if getattr(cfg, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION:
            cfg._experts_implementation = rec.fallback
    return n


def experts_forward(
    mod: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The converted experts module's forward: :func:`~hf_nvfp4.ops.experts.quantized_experts`
    with the module's weights, layout flags and gate, same contract as transformers' ``grouped_mm``."""
    rec = mod.nvfp4_experts
    up_name = "gate_up_proj" if mod.has_gate else "up_proj"
    return quantized_experts(
        hidden_states,
        top_k_index,
        top_k_weights,
        getattr(mod, up_name),
        mod.down_proj,
        mod._apply_gate if mod.has_gate else mod.act_fn,
        rec.plan(hidden_states.device),
        up_bias=getattr(mod, up_name + "_bias") if mod.has_bias else None,
        down_bias=mod.down_proj_bias if mod.has_bias else None,
        transposed=mod.is_transposed,
        post_norm=mod.post_expert_norm if getattr(mod, "has_post_expert_norm", False) else None,
    )


def _register() -> None:
    """Every conversion plans, converts and unconverts experts too (idempotent)."""
    for hooks, fn in ((ON_PLAN, plan_experts), (ON_CONVERT, convert_experts), (ON_UNCONVERT, unconvert_experts)):
        if fn not in hooks:
            hooks.append(fn)


_register()
