"""convert_model: swap eligible nn.Linear layers for NVFP4Linear, in place, per the recipe."""

from __future__ import annotations

import fnmatch
import logging

import torch.nn as nn

from ..config import PRECISIONS, NVFP4Config
from .linear import NVFP4Linear, RecipeState

logger = logging.getLogger("hf_nvfp4")
LM_HEAD_NAMES = ("lm_head", "embed_out", "output_layer", "score")


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's stack of transformer (or Mamba / hybrid) blocks, found by structure.

    The nn.ModuleList with the most children that contain Linear layers; works for
    ``model.layers`` (Llama, Qwen, Mistral), ``backbone.layers`` (Nemotron-H), ``h``
    (GPT-style) alike. ("", []) when there is none.
    """
    best_name, best = "", []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            kids = [c for c in mod if any(isinstance(m, nn.Linear) for m in c.modules())]
            if len(kids) > len(best):
                best_name, best = name, list(mod)
    return best_name, best


def _lm_head_names(model: nn.Module) -> set[str]:
    names = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            names.add(name)
        elif name.split(".")[-1] in LM_HEAD_NAMES and isinstance(mod, nn.Linear):
            names.add(name)
    return names


def _matches(name: str, patterns: list[str]) -> bool:
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(s, p) for p in patterns for s in suffixes)


def plan_conversion(model: nn.Module, config: NVFP4Config) -> dict[str, str]:
    """Decide, for every nn.Linear, ``"convert"`` or the reason it stays high precision."""
    _, blocks = find_blocks(model)
    first, last = config.resolved_bf16_blocks(len(blocks))
    bf16_blocks = {id(b) for b in blocks[:first]} | {id(b) for b in blocks[len(blocks) - last :]}
    in_bf16_block = set()
    for b in blocks:
        if id(b) in bf16_blocks:
            in_bf16_block |= {id(m) for m in b.modules()}
    heads = _lm_head_names(model)
    plan = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name in heads:
            plan[name] = "lm_head"
        elif _matches(name, config.modules_to_not_convert):
            plan[name] = "modules_to_not_convert"
        elif id(mod) in in_bf16_block:
            plan[name] = "bf16 block"
        elif mod.in_features % 16 or mod.out_features % 16:
            plan[name] = f"shape {mod.out_features}x{mod.in_features} not divisible by 16"
        else:
            plan[name] = "convert"
    # MoE (issue 17): experts modules (3-D expert weights) and Linear routers, see nn/experts.py
    from .experts import plan_experts

    plan.update(plan_experts(model, config))
    return plan


def convert_model(model: nn.Module, config: NVFP4Config | None = None, *, rank: int = 0) -> nn.Module:
    """Swap eligible ``nn.Linear`` layers of ``model`` for :class:`NVFP4Linear`, in place.

    Embeddings and the LM head never convert; whole blocks at the ends stay BF16 as the
    config says; layers with a dimension not divisible by 16 stay high precision (named in
    one log line). Parameters are untouched, so the state_dict is exactly the original's.

    >>> import torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)))
    >>> type(m[0]).__name__
    'NVFP4Linear'
    """
    config = config or NVFP4Config()
    if not isinstance(config, NVFP4Config):
        raise TypeError(f"convert_model: config must be an NVFP4Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model: model must be a torch.nn.Module, got {type(model).__name__}")
    state = RecipeState(config, rank=rank)
    plan = plan_conversion(model, config)
    modules = dict(model.named_modules())
    converted = []
    for name, decision in plan.items():
        mod = modules[name]
        if decision != "convert" or not isinstance(mod, nn.Linear) or isinstance(mod, NVFP4Linear):
            continue
        mod.__class__ = NVFP4Linear
        mod._init_nvfp4(state)
        converted.append(mod)
    odd = [n for n, d in plan.items() if d.startswith("shape")]
    if odd:
        logger.warning(
            "hf_nvfp4: %d Linear layer(s) stay high precision, a dimension not divisible by 16: %s",
            len(odd),
            ", ".join(odd),
        )
    from .te_backend import select_backend

    backend, why = select_backend(config, model)
    if backend == "te":
        from .te_backend import attach_te

        for mod in converted:
            attach_te(mod)
    for mod in converted:
        mod.backend = backend
    model.nvfp4_state = state
    n_linear = sum(isinstance(modules[n], nn.Linear) for n in plan)
    logger.info("hf_nvfp4: converted %d of %d Linear layers (%s backend: %s)", len(converted), n_linear, backend, why)
    # MoE experts and the coverage report (issue 17): nn/experts.py, nn/coverage.py
    from .coverage import log_coverage
    from .experts import convert_experts

    convert_experts(model, plan, state, backend)
    log_coverage(model)
    return model


def unconvert_model(model: nn.Module) -> nn.Module:
    """Turn every NVFP4Linear back into a plain nn.Linear (same parameters), in place."""
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            for attr in ("nvfp4_state", "_precision", "_forward_precision", "backend", "_te_module"):
                mod.__dict__.pop(attr, None)
            mod.__class__ = nn.Linear
    from .experts import unconvert_experts  # MoE (issue 17)

    unconvert_experts(model)
    model.__dict__.pop("nvfp4_state", None)
    return model


def set_precision(model: nn.Module, precision: str, scope: str = "all") -> int:
    """Set the precision of every NVFP4Linear in ``model``; returns how many changed.

    scope="all": all three GEMMs (the paper's late switch); scope="forward": Fprop only
    (the cheap variant that recovers most of the gap).

    >>> import torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(32, 32)))
    >>> hf_nvfp4.set_precision(m, "bf16", scope="forward")
    1
    """
    if precision not in PRECISIONS:
        raise ValueError(f"set_precision: precision must be one of {PRECISIONS}, got {precision!r}")
    if scope not in ("all", "forward"):
        raise ValueError(f"set_precision: scope must be 'all' or 'forward', got {scope!r}")
    n = 0
    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            if scope == "all":
                mod.precision, mod.forward_precision = precision, None
            else:
                mod.forward_precision = None if precision == mod.precision else precision
            n += 1
    from .experts import set_experts_precision  # MoE (issue 17)

    return n + set_experts_precision(model, precision, scope)
