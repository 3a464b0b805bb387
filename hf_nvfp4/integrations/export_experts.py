"""Checkpoint names for the export, and mixture-of-experts export: per-expert NVFP4 tensors
under the checkpoint names vLLM loads.

transformers 5.x keeps an MoE block's routed experts as 3-D parameters (``gate_up_proj``
``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``), but the checkpoints vLLM reads name one Linear per
expert and projection: ``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` (Qwen-MoE,
DeepSeek, OLMoE) or ``block_sparse_moe.experts.{e}.w1`` / ``w3`` / ``w2`` (Mixtral). vLLM's
``FusedMoE.make_expert_params_mapping`` loads those into its own ``w13`` / ``w2`` tensors, and its
NVFP4 MoE methods (``compressed_tensors_moe_w4a4_nvfp4.py`` for compressed-tensors,
``ModelOptNvFp4FusedMoE`` in ``modelopt.py``) keep one weight global scale per expert for w13,
warning when gate's and up's differ.

The names come from transformers' own conversion mapping, run backwards as ``save_pretrained``
does (``revert_weight_conversion``) on placeholder tensors whose values say which expert and
which half each checkpoint key holds: no model list is kept here.

Training quantizes an expert's gate and up as one ``[2I, H]`` matrix (one tensor scale), so
gate_proj and up_proj are written with that one scale, and every expert is bit for bit the
operand its Fprop GEMM used: the 16x16 tiles' scales are stored per row, so splitting the rows
into gate and up loses nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formats.nvfp4 import NVFP4Tensor, quantize_nvfp4
from ..nn.experts import expert_params
from ..ops.roles import quantizer_for


def converted_experts(model: nn.Module) -> dict[str, nn.Module]:
    """Experts modules that trained in NVFP4, by name."""
    out = {}
    for name, mod in model.named_modules():
        rec = getattr(mod, "nvfp4_experts", None)
        if rec is not None and rec.converted:
            out[name] = mod
    return out


def unsupported_layout(mod: nn.Module) -> str | None:
    """Why vLLM's NVFP4 MoE loaders cannot take this experts module's weights as they are (None: they can)."""
    cls = type(mod).__name__
    if getattr(getattr(mod, "nvfp4_experts", None), "adapter", None):
        return f"{cls} trains through hf_nvfp4's own adapter; its serving layout is not wired for export"
    if getattr(mod, "is_transposed", False):
        return f"{cls} stores its experts transposed ([E, in, out]; vLLM reads per-expert [out, in] NVFP4)"
    if not getattr(mod, "is_concatenated", True):
        return f"{cls} interleaves gate and up rows (vLLM's w13 is [gate; up])"
    if getattr(mod, "has_bias", False):
        return f"{cls} has expert biases (vLLM's NVFP4 MoE methods have none)"
    if getattr(mod, "has_post_expert_norm", False):
        return f"{cls} normalises expert outputs (no NVFP4 MoE method in vLLM does)"
    return None


def _up_name(mod: nn.Module) -> str:
    return "gate_up_proj" if getattr(mod, "has_gate", True) else "up_proj"


def checkpoint_names(model: nn.Module) -> dict[str, tuple[str, int | None, int | None]]:
    """{checkpoint key: (state_dict key, expert, half)} as transformers would save the model.

    ``expert``/``half`` are None for keys that are only renamed; for a gate_up parameter half 0
    is the gate rows, 1 the up rows. Raises ValueError when the mapping does not split experts.
    """
    from transformers.core_model_loading import revert_weight_conversion

    experts = {f"{n}.{p}": (n, p) for n, m in model.named_modules() for p in expert_params(m)}
    modules = dict(model.named_modules())
    placeholders, origin, nxt = {}, {}, 0
    for key, t in model.state_dict().items():
        if key in experts:
            mname, p = experts[key]
            halves = 2 if p == "gate_up_proj" and getattr(modules[mname], "has_gate", True) else 1
            shape = (t.shape[0], halves, 1)
        else:
            shape = (1,)
        n = 1
        for s in shape:
            n *= s
        ids = torch.arange(nxt, nxt + n, dtype=torch.int64)
        for i, v in enumerate(ids.tolist()):
            origin[v] = (key, i // shape[1] if len(shape) == 3 else None, i % shape[1] if len(shape) == 3 else None)
        placeholders[key] = ids.reshape(shape)
        nxt += n
    reverted = revert_weight_conversion(model, placeholders)
    out = {}
    for key, v in reverted.items():
        vals = v.reshape(-1).tolist()
        if len(vals) != 1:
            raise ValueError(
                f"export_nvfp4: transformers' checkpoint mapping for {type(model).__name__} keeps {key} as one tensor "
                f"of {len(vals)} experts/halves; the per-expert layout vLLM loads is unknown for this model"
            )
        out[key] = origin[vals[0]]
    return out


def training_tile(mod: nn.Module) -> tuple[int, int]:
    """The tile of the experts' Fprop weight operand, from the role table."""
    return quantizer_for(mod.nvfp4_experts.state.recipe, "fprop_weight", "nvfp4").tile


@torch.no_grad()
def quantize_experts(mod: nn.Module) -> dict[str, list[NVFP4Tensor]]:
    """{parameter name: one NVFP4Tensor per expert}: the Fprop weight operands training used
    (:func:`hf_nvfp4.ops.experts.quantized_experts` quantizes each expert's matrix alone)."""
    tile = training_tile(mod)
    return {p: [quantize_nvfp4(w, tile=tile) for w in getattr(mod, p).detach().unbind(0)]
            for p in (_up_name(mod), "down_proj")}


def split_rows(q: NVFP4Tensor, half: int | None, halves: int) -> NVFP4Tensor:
    """Rows of one half (gate or up) of a quantized gate_up matrix; scales are stored per row."""
    if half is None or halves == 1:
        return q
    rows = q.data.shape[0] // halves
    sl = slice(half * rows, (half + 1) * rows)
    return NVFP4Tensor(q.data[sl], q.scale[sl], q.amax, torch.Size((rows, q.shape[-1])), q.tile, q.rht)


def expert_module_names(model: nn.Module, names: dict[str, tuple], experts_module: str) -> list[str]:
    """The checkpoint module names (``...experts.3.gate_proj``) of one experts module's matrices."""
    out = []
    for key, (src, e, _) in names.items():
        if e is not None and src.rpartition(".")[0] == experts_module:
            out.append(key.removesuffix(".weight"))
    return sorted(out)


def checkpoint_names_or_own(model: nn.Module, experts: dict) -> dict[str, tuple[str, int | None, int | None]]:
    """{checkpoint key: (state_dict key, expert, half)}: the names ``save_pretrained`` writes (per expert)."""
    try:
        return checkpoint_names(model)
    except ValueError:
        if experts:
            raise
    except Exception as exc:  # noqa: BLE001 - a model-specific reverse mapping that placeholders cannot drive
        if experts:
            raise ValueError(
                f"export_nvfp4: could not derive the per-expert checkpoint names of {type(model).__name__} from "
                f"transformers' conversion mapping ({type(exc).__name__}: {exc})"
            ) from exc
    return {k: (k, None, None) for k in model.state_dict()}  # dense model: its own names


def revert(model: nn.Module, hp: dict, ckpt: dict) -> dict:
    """The high-precision tensors under their checkpoint names (transformers' reverse mapping)."""
    if all(k == v[0] for k, v in ckpt.items()):
        return hp
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, hp)


def checkpoint_modules(high_precision: dict, by_src: dict) -> list[str]:
    """The checkpoint module names of what stays high precision (compressed-tensors ``ignore``,
    ModelOpt ``exclude_modules``): an experts module adds its own name and one per expert matrix."""
    out = set()
    for n in high_precision:
        keys = by_src.get(f"{n}.weight")
        if keys:
            out |= {k.removesuffix(".weight") for k, _, _ in keys}
            continue
        per_expert = [k for src, v in by_src.items() if src.rpartition(".")[0] == n for k, e, _ in v if e is not None]
        if per_expert:  # an experts module kept in BF16: ...experts and ...experts.{e}.gate_proj
            out |= {k.removesuffix(".weight") for k in per_expert}
            out.add(per_expert[0].removesuffix(".weight").rsplit(".", 2)[0])
        else:
            out.add(n)
    return sorted(out)
