"""Transformer Engine recipes for NVFP4Linear calls, with every field TE reads from ``NVTE_*`` pinned.

TE's recipe dataclasses take several defaults from environment variables read when TE is
imported (``transformer_engine/common/recipe/__init__.py``, TE 2.20), so a stray variable
would silently change the recipe (``NVTE_BACKWARD_OVERRIDE=high_precision`` makes the whole
backward BF16). Each such field that exists in the installed TE is passed explicitly here;
fields this module does not know are named once in the log. Nothing here imports TE: the
caller hands in TE's ``transformer_engine.common.recipe`` module.

Precision -> TE recipe (the emulated format with the same numerics):

- ``nvfp4``: ``NVFP4BlockScaling`` (TE >= 2.8)
- ``fp8_tensor``: ``Float8CurrentScaling(fp8_format=E4M3)``, fp32 scales
- ``fp8_block``: ``Float8BlockScaling(fp8_format=E4M3)``, 1x128 / 128x128 blocks, power-of-two
  scales unless ``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`` (the emulated format's own rule)
- ``mxfp8``: ``MXFP8BlockScaling(fp8_format=E4M3)``
- ``nvfp4`` with ``forward_precision="bf16"`` (the forward-only late switch): a ``CustomRecipe``
  whose input and weight quantizers are ``HybridQuantizer(rowwise=IdentityQuantizer(dtype=compute
  dtype), columnwise=NVFP4Quantizer(...))`` (BF16 Fprop, NVFP4 Dgrad/Wgrad), TE >= 2.19

Names: ``recipe`` is our frozen numerics recipe (``NVFP4Recipe``); a "TE recipe" is TE's recipe
object, built from TE's ``transformer_engine.common.recipe`` module (``te_recipe_mod``). What TE
can run per format (alignment, dims, RHT dtype, fp16 output) is read from the format registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging

import torch

from ..formats.fp8 import default_pow2_scales
from ..formats.registry import TE_SUPPORT, te_support

logger = logging.getLogger("hf_nvfp4")

# NVFP4BlockScaling fields whose TE default comes from an environment variable, and the
# paper's value. The three recipe flags (NVTE_NVFP4_DISABLE_RHT / _STOCHASTIC_ROUNDING /
# _2D_QUANTIZATION) are always passed from our recipe.
NVFP4_PINS = {
    "backward_override": None,  # NVTE_BACKWARD_OVERRIDE (2.15+)
    "row_scaled_activation": False,  # NVTE_NVFP4_ROW_SCALED_ACTIVATION (2.16+)
    "nvfp4_4over6": "none",  # NVTE_NVFP4_4OVER6 (2.17+)
    "nvfp4_4over6_e4m3_use_256": "all",  # NVTE_NVFP4_4OVER6_E4M3_USE_256 (2.17+, used only with 4over6)
    "nvfp4_4over6_err_mode": "MAE",  # NVTE_NVFP4_4OVER6_ERR_MODE (2.17+, used only with 4over6)
    "fp8_dpa": False,
    "fp8_mha": False,
}
FLAGS = ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization")
# Fields of each recipe class that carry no environment default (TE 2.20); anything else a
# newer TE adds is reported once, since its default may come from a variable.
_KNOWN = {
    "NVFP4BlockScaling": set(FLAGS) | set(NVFP4_PINS) | {"fp4_format", "fp8_format"},
    "Float8CurrentScaling": {
        "use_power_2_scales",
        "fp8_format",
        "fp8_gemm_fprop",
        "fp8_gemm_dgrad",
        "fp8_gemm_wgrad",
        "fp8_dpa",
        "fp8_mha",
        "backward_override",
    },
    "Float8BlockScaling": {
        "use_f32_scales",
        "fp8_format",
        "x_block_scaling_dim",
        "w_block_scaling_dim",
        "grad_block_scaling_dim",
        "fp8_gemm_fprop",
        "fp8_gemm_dgrad",
        "fp8_gemm_wgrad",
        "fp8_dpa",
        "fp8_mha",
        "backward_override",
    },
    "MXFP8BlockScaling": {"margin", "fp8_format", "fp8_dpa", "fp8_mha", "backward_override", "enable_2d_quantization"},
    "CustomRecipe": {"qfactory", "fp8_format", "fp8_dpa", "fp8_mha", "backward_override", "quantization_alignment"},
}
TE_PRECISIONS = tuple(TE_SUPPORT)  # the formats TE has a recipe for (formats/registry.py)
LATE_SWITCH_COST = (
    "the forward-only late switch (BF16 Fprop, NVFP4 Dgrad/Wgrad) needs TE's HybridQuantizer and "
    "IdentityQuantizer in a CustomRecipe (TE >= 2.19); with older TE a quantizer role serves both the "
    "forward and the backward use of a tensor, so it cannot be expressed, and these layers run all "
    "three GEMMs on the emulated path, which is much slower than TE's kernels. Upgrade TE, or switch "
    "all three GEMMs with set_precision(model, 'bf16')"
)
_REPORTED: set[str] = set()


def recipe_fields(cls) -> set[str]:
    """Constructor fields of a TE recipe class (pydantic or stdlib dataclass)."""
    try:
        return {f.name for f in dataclasses.fields(cls)}
    except TypeError:
        return set(inspect.signature(cls).parameters)


def te_recipe_kwargs(recipe, fields: set[str] | None = None) -> dict:
    """``NVFP4BlockScaling(**kwargs)`` for our ``recipe`` (anything with NVFP4Recipe's field names).

    Without ``fields``: the three flags, which have TE's names and meanings. With the
    installed recipe's ``fields``: also every ``NVFP4_PINS`` entry that exists there.

    >>> from hf_nvfp4 import NVFP4Config
    >>> sorted(te_recipe_kwargs(NVFP4Config(), {"disable_rht", "backward_override"}).items())[:2]
    [('backward_override', None), ('disable_2d_quantization', False)]
    """
    kw = {name: bool(getattr(recipe, name)) for name in FLAGS}
    if fields is not None:
        kw.update({k: v for k, v in NVFP4_PINS.items() if k in fields})
    return kw


def _pinned(cls, **wanted) -> dict:
    fields = recipe_fields(cls)
    unknown = sorted(fields - _KNOWN.get(cls.__name__, fields))
    if unknown and cls.__name__ not in _REPORTED:
        _REPORTED.add(cls.__name__)
        logger.warning(
            "hf_nvfp4: this Transformer Engine's %s has field(s) %s the adapter does not pin; check that "
            "no NVTE_* variable sets them",
            cls.__name__,
            unknown,
        )
    return {k: v for k, v in wanted.items() if k in fields}


def _set_qparams(te_recipe_mod, te_recipe, power_2_scale: bool) -> None:
    # Float8CurrentScaling / Float8BlockScaling compute these class attributes from NVTE_* at
    # TE import, not per instance, so passing the scale field alone does not pin them.
    q = te_recipe_mod.QParams(power_2_scale=power_2_scale, amax_epsilon=0.0)
    for name in ("fp8_quant_fwd_inp", "fp8_quant_fwd_weight", "fp8_quant_bwd_grad"):
        setattr(te_recipe, name, q)


def nvfp4_te_recipe(te_recipe_mod, recipe):
    cls = te_recipe_mod.NVFP4BlockScaling
    kw = te_recipe_kwargs(recipe, recipe_fields(cls))
    return cls(**_pinned(cls, **kw))


def _fp8_te_recipe(te_recipe_mod, recipe, precision: str):
    e4m3 = te_recipe_mod.Format.E4M3  # the emulated FP8 formats are E4M3 for gradients too
    if precision == "fp8_tensor":
        cls = te_recipe_mod.Float8CurrentScaling
        r = cls(
            **_pinned(
                cls, use_power_2_scales=False, fp8_format=e4m3, backward_override=None, fp8_dpa=False, fp8_mha=False
            )
        )
        _set_qparams(te_recipe_mod, r, False)
        return r
    if precision == "fp8_block":
        cls = te_recipe_mod.Float8BlockScaling
        pow2 = default_pow2_scales()
        w_dim = 1 if recipe.disable_2d_quantization else 2
        r = cls(
            **_pinned(
                cls,
                use_f32_scales=not pow2,
                fp8_format=e4m3,
                x_block_scaling_dim=1,
                w_block_scaling_dim=w_dim,
                grad_block_scaling_dim=1,
                backward_override=None,
                fp8_dpa=False,
                fp8_mha=False,
            )
        )
        _set_qparams(te_recipe_mod, r, pow2)
        return r
    cls = te_recipe_mod.MXFP8BlockScaling
    return cls(
        **_pinned(
            cls,
            margin=0,
            fp8_format=e4m3,
            backward_override=None,
            enable_2d_quantization=False,
            fp8_dpa=False,
            fp8_mha=False,
        )
    )


def late_switch_te_recipe(te_recipe_mod, recipe, compute_dtype):
    """CustomRecipe for BF16 Fprop + NVFP4 Dgrad/Wgrad, or None where TE cannot express it.

    The Fprop ``IdentityQuantizer`` gets ``dtype=compute_dtype``: with ``dtype=None`` it keeps
    each tensor's own dtype (pytorch/tensor/identity_tensor.py:45-77 at d0067d0da), and TE
    quantizes the weight from the parameter itself (module/linear.py:478-488, ``workspace_dtype``
    is not applied to it), so fp32 master weights would meet a bf16 input in one cuBLAS call.
    The TE recipe therefore depends on the compute dtype; callers cache it per dtype.
    """
    try:
        nvfp4_tensor = importlib.import_module("transformer_engine.pytorch.tensor.nvfp4_tensor")
        hybrid = importlib.import_module("transformer_engine.pytorch.tensor.hybrid_tensor")
        identity = importlib.import_module("transformer_engine.pytorch.tensor.identity_tensor")
    except ImportError:
        return None
    custom = getattr(te_recipe_mod, "CustomRecipe", None)
    if custom is None:
        return None
    rht = not recipe.disable_rht
    sr = not recipe.disable_stochastic_rounding
    two_d = not recipe.disable_2d_quantization
    nvfp4 = nvfp4_tensor.NVFP4Quantizer

    def qfactory(role):
        # Rowwise = Fprop's operand, columnwise = the backward's (TE's hybrid_tensor.py);
        # columnwise_source="original": the backward operands come from the unrounded tensors,
        # as in the emulated late switch.
        kind = getattr(role, "tensor_type", "") if role is not None else ""
        if kind == "input":
            col = nvfp4(with_rht=rht, with_post_rht_amax=rht, with_2d_quantization=False, stochastic_rounding=False)
        elif kind == "weight":
            col = nvfp4(with_rht=False, with_post_rht_amax=False, with_2d_quantization=two_d, stochastic_rounding=False)
        elif kind == "grad_output":
            return nvfp4(with_rht=rht, with_post_rht_amax=rht, with_2d_quantization=False, stochastic_rounding=sr)
        else:  # output / grad_input slots: not quantized (the GEMMs output in high precision)
            return identity.IdentityQuantizer(dtype=compute_dtype)
        return hybrid.HybridQuantizer(
            rowwise_quantizer=identity.IdentityQuantizer(dtype=compute_dtype), columnwise_quantizer=col
        )

    return custom(**_pinned(custom, qfactory=qfactory, backward_override=None, fp8_dpa=False, fp8_mha=False))


def build_te_recipe(te_recipe_mod, recipe, precision: str, forward_precision: str | None, compute_dtype=None):
    """(TE recipe, None), or (None, why TE cannot run this precision combination).

    ``recipe`` is our frozen numerics recipe; the TE recipe is built from TE's
    ``transformer_engine.common.recipe`` module, handed in as ``te_recipe_mod``.
    """
    if forward_precision is None:
        if precision == "nvfp4":
            return nvfp4_te_recipe(te_recipe_mod, recipe), None
        if precision in TE_PRECISIONS:
            return _fp8_te_recipe(te_recipe_mod, recipe, precision), None
        return None, f"Transformer Engine has no recipe for precision={precision!r}"
    if precision == "nvfp4" and forward_precision == "bf16":
        r = late_switch_te_recipe(te_recipe_mod, recipe, compute_dtype)
        return (r, None) if r is not None else (None, LATE_SWITCH_COST)
    return (
        None,
        f"no Transformer Engine recipe for precision={precision!r} with forward_precision={forward_precision!r}",
    )


def compute_dtype_reason(recipe, precision: str, compute_dtype) -> str | None:
    """Why TE cannot run ``precision`` with this compute dtype, or None (formats/registry.py TE_SUPPORT).

    RHT takes bf16 input only; an FP4 GEMM cannot write fp16 (so no NVFP4 GEMM, late switch
    included, runs with fp16 compute).
    """
    sup = te_support(precision)
    if sup is None:
        return None
    if not sup.fp16_out and compute_dtype == torch.float16:
        return (
            f"TE's {precision} GEMMs cannot write fp16 (cublaslt_gemm.cu: \"FP4 GEMM does not support FP16 "
            "output!\"): fp16 calls run on the emulated path (train in bf16 to use TE)"
        )
    if sup.rht_dtype is not None and not recipe.disable_rht and compute_dtype != sup.rht_dtype:
        short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
        return (
            f"TE's RHT takes {short[sup.rht_dtype]} input only (quantizer.cpp), this model computes in "
            f"{short.get(compute_dtype, compute_dtype)}: "
            "those calls run on the emulated path (train under torch.autocast('cuda', dtype=torch.bfloat16) "
            "to use TE, or set disable_rht=True)"
        )
    return None


def token_multiple(precision: str) -> int:
    """Token count (product of the leading dims) the adapter pads to for ``precision``.

    TE's own alignment for quantized grouped operations, ``get_align_size_for_quantization``
    (pytorch/quantization.py:262-279 at d0067d0da): NVFP4 128 (the tokens are the packed K
    dimension of the NVFP4 Wgrad GEMM), MXFP8 32, FP8 16. The late switch's CustomRecipe
    has ``quantization_alignment=128`` (common/recipe/__init__.py), the NVFP4 value.
    """
    return te_support(precision).align


def layer_unsupported(precision: str, in_features: int, out_features: int) -> str | None:
    d = te_support(precision).dims
    if in_features % d or out_features % d:
        return f"TE's {precision} needs both weight dims divisible by {d}; this layer is {out_features}x{in_features}"
    return None
