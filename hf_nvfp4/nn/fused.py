"""``fused_global_scale``: layers a serving engine runs as one GEMM share one weight tensor scale.

vLLM runs q/k/v as one GEMM and gate/up as one GEMM, with one NVFP4 tensor scale per group.
TE (and the default recipe) gives every layer its own, so an export would have to re-quantize
the smaller siblings. With ``fused_global_scale=True`` every converted Linear of such a group
quantizes its weight with the group's joint amax during training, and the export writes
exactly that.

Groups come from the model's structure: the converted Linears that read the very same input
tensor in one forward. That forward is traced once, at the model's first call, on the caller's
token ids (its own arguments when it gives none) under ``FakeTensorMode`` (shapes only: no
compute, no memory, no random draws). If the trace cannot run (a model whose forward depends
on data values), the groups fall back to sibling names (:data:`FUSED_SIBLINGS`, vLLM's
``packed_modules_mapping``) with equal input width, and a warning says so. An expert's gate and
up are one ``[2I, H]`` matrix, so they always share one scale (no group needed).

>>> import torch, hf_nvfp4
>>> from transformers import LlamaConfig
>>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
...                   num_attention_heads=4, vocab_size=256)
>>> model = hf_nvfp4.from_config(cfg, hf_nvfp4.NVFP4Config(bf16_last_blocks=0, fused_global_scale=True))
>>> [len(g) for g in find_fused_groups(model, input_ids=torch.zeros(1, 16, dtype=torch.long))]
[3, 2]
"""

from __future__ import annotations

import inspect
import logging

import torch
import torch.nn as nn

from .convert import ON_CONVERT, ON_UNCONVERT
from .linear import NVFP4Linear, NVFP4State

logger = logging.getLogger("hf_nvfp4")
# The groups serving engines fuse by name (vLLM's packed_modules_mapping: qkv_proj, gate_up_proj,
# DeepSeek/GLM's fused_qkv_a_proj; w1/w3 of Mixtral-style experts). Used by the export, and as the
# trace's fallback.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"),
                  ("w1", "w3"))
_TRACING = [False]
CACHE_ARGS = ("past_key_values", "cache_params", "past_key_value")


def tracing() -> bool:
    """True while a fused-group trace runs: experts modules then return zeros of the right shape
    (their grouped GEMM kernels have no fake-tensor path for every dtype, and need no group)."""
    return _TRACING[0]


class FusedGroup:
    """Converted Linears that share one weight tensor scale: the max of their weights' amax.

    The joint amax is recomputed only when a member's weight changed (optimizer step, load):
    keyed by each weight's storage and version counter. Members are held by plain references, so
    a deep copy of the model gets groups of its own layers.
    """

    def __init__(self, names: list[str], layers: list[NVFP4Linear]):
        self.names = tuple(names)
        self._layers = list(layers)
        self._key: tuple | None = None
        self._amax: torch.Tensor | None = None

    def weights(self) -> list[torch.Tensor]:
        return [m.weight for m in self._layers]

    @torch.no_grad()
    def amax(self) -> torch.Tensor:
        ws = self.weights()
        key = tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in ws)
        if key != self._key or self._amax is None:
            self._amax = torch.stack([w.detach().abs().amax().float().to(ws[0].device) for w in ws]).max()
            self._key = key
        return self._amax

    def __repr__(self) -> str:
        return f"FusedGroup({', '.join(self.names)})"


def _linears(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)}


def trace_groups(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> list[list[str]]:
    """Names of the converted Linears that read the identical input tensor in one forward of
    ``model(*args, **kwargs)``, run under FakeTensorMode in high precision (nothing computed)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    linears = _linears(model)
    seen: dict[int, tuple[torch.Tensor, list[str]]] = {}  # the tensor is kept: ids of freed tensors get reused

    def record(mod, inputs):
        t = inputs[0]
        seen.setdefault(id(t), (t, []))[1].append(linears[mod])

    kwargs = dict(kwargs or {})
    for k in CACHE_ARGS:  # a generation cache given to the first call must not receive fake entries
        kwargs.pop(k, None)
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    saved = [(m, dict(m._buffers), {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)})
             for m in model.modules()]
    handles = [m.register_forward_pre_hook(record) for m in linears]
    states = {id(m.nvfp4_state): m.nvfp4_state for m in linears}
    state = getattr(model, "nvfp4_state", None)
    if state is not None:
        states[id(state)] = state
    switched = {k: (st.precision, st.forward_precision) for k, st in states.items()}
    try:
        _TRACING[0] = True
        for st in states.values():  # high precision: plain F.linear on fake tensors
            st.set_precision("bf16", None)
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        _TRACING[0] = False
        # autocast caches casts of parameters until its region ends: drop the fake ones it made here
        torch.clear_autocast_cache()
        for m, buffers, tensors in saved:  # and undo any state the forward left on a module
            m._buffers.update(buffers)
            for k, v in list(m.__dict__.items()):
                if isinstance(v, FakeTensor):
                    if k in tensors:
                        m.__dict__[k] = tensors[k]
                    else:
                        del m.__dict__[k]
        for k, st in states.items():
            st.set_precision(*switched[k])
    return [names for _, names in seen.values() if len(names) > 1]


def named_groups(model: nn.Module) -> list[list[str]]:
    """The fallback: converted siblings named as in :data:`FUSED_SIBLINGS`, with equal input width."""
    linears = {n: m for m, n in _linears(model).items()}
    groups = []
    for parent in dict.fromkeys(n.rpartition(".")[0] for n in linears):
        for sib in FUSED_SIBLINGS:
            found = [m for m in (f"{parent}.{x}".lstrip(".") for x in sib) if m in linears]
            if len(found) > 1 and len({linears[m].in_features for m in found}) == 1:
                groups.append(found)
    return groups


def assign_groups(model: nn.Module, groups: list[list[str]]) -> list[FusedGroup]:
    """Give every member of ``groups`` its :class:`FusedGroup` (``layer.nvfp4_group``); others get none."""
    modules = dict(model.named_modules())
    for m in _linears(model):
        m.__dict__.pop("nvfp4_group", None)
    out = []
    for names in groups:
        g = FusedGroup(names, [modules[n] for n in names])
        for n in names:
            modules[n].__dict__["nvfp4_group"] = g  # a plain attribute: never in the state_dict
        out.append(g)
    model.__dict__["nvfp4_fused_groups"] = out
    return out


def find_fused_groups(model: nn.Module, *args, **kwargs) -> list[list[str]]:
    """Find (by tracing ``model(*args, **kwargs)``) and assign the fused groups now; returns their names.

    Converted models with ``fused_global_scale=True`` do this by themselves at their first forward.
    """
    _drop_finder(model)  # found now: the first forward need not search
    try:
        groups = trace_groups(model, args, kwargs)
        how = "traced"
    except Exception as exc:  # noqa: BLE001 - any model code may fail on fake tensors; fall back, loudly
        groups = named_groups(model)
        how = "by name"
        logger.warning(
            "hf_nvfp4: fused_global_scale: tracing %s's forward on fake tensors failed (%s: %s); fused groups "
            "taken from sibling names %s instead (%d groups)", type(model).__name__, type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "", [list(s) for s in FUSED_SIBLINGS], len(groups))
    assign_groups(model, groups)
    logger.info("hf_nvfp4: fused_global_scale: %d groups of layers share a weight tensor scale (%s)", len(groups), how)
    return groups


class _FindAtFirstForward:
    """A forward pre-hook (with kwargs) on the converted model: find the groups once, then remove itself."""

    def __init__(self, model: nn.Module):
        model.register_forward_pre_hook(self, with_kwargs=True)
        self.busy = False

    def __call__(self, model, args, kwargs):
        if self.busy:
            return None
        self.busy = True
        # a language model is traced on its token ids alone: no cache, mask or generation state
        # of the caller's call takes part (they may hold state a fake forward must not touch)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            find_fused_groups(model, input_ids=ids)  # removes this hook first
        else:
            find_fused_groups(model, *args, **kwargs)
        return None


def convert_fused(model: nn.Module, state: NVFP4State) -> None:
    """``ON_CONVERT``: with ``fused_global_scale``, find the groups at the model's first forward."""
    unconvert_fused(model)
    if state.recipe.fused_global_scale and _linears(model):
        model.__dict__["_nvfp4_find_groups"] = _FindAtFirstForward(model)


def _drop_finder(model: nn.Module) -> None:
    """Remove a pending first-forward search (found by type, so a deep copy's own hook goes too)."""
    model.__dict__.pop("_nvfp4_find_groups", None)
    for k, v in list(model._forward_pre_hooks.items()):
        if isinstance(v, _FindAtFirstForward):
            del model._forward_pre_hooks[k]
            model._forward_pre_hooks_with_kwargs.pop(k, None)


def unconvert_fused(model: nn.Module) -> None:
    """``ON_UNCONVERT``: drop the groups and a pending first-forward search."""
    _drop_finder(model)
    model.__dict__.pop("nvfp4_fused_groups", None)
    for m in model.modules():
        m.__dict__.pop("nvfp4_group", None)


for _hooks, _fn in ((ON_CONVERT, convert_fused), (ON_UNCONVERT, unconvert_fused)):
    if _fn not in _hooks:
        _hooks.append(_fn)
