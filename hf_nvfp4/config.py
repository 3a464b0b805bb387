"""The recipe: one frozen dataclass, its names, the paper's defaults, bounds, validation and baselines.

The ground floor above ``formats``: everything that decides *what* a converted model computes and
nothing that computes it. The role table that turns a recipe into quantizers is
:mod:`hf_nvfp4.ops.roles`; the HF quantization config (:class:`hf_nvfp4.NVFP4Config`) holds one
of these and takes its field list from here.

A Linear's three GEMMs have six operands (the paper's words)::

    fprop  y  = x  . W^T     roles fprop_input, fprop_weight
    dgrad  dx = dy . W       roles dgrad_grad_output, dgrad_weight
    wgrad  dW = dy^T . x     roles wgrad_grad_output, wgrad_input

>>> from hf_nvfp4.config import NVFP4Recipe, mxfp4_paper
>>> NVFP4Recipe(bf16_last_blocks=2).resolved_bf16_blocks(8), mxfp4_paper().rht_size
((0, 2), 32)
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields

from .formats.registry import PRECISIONS, get_format

ROLES = ("fprop_input", "fprop_weight", "dgrad_grad_output", "dgrad_weight", "wgrad_grad_output", "wgrad_input")
GEMMS = ("fprop", "dgrad", "wgrad")
# Where the paper puts RHT and stochastic rounding. Any other placement is a negative control
# (App. E.3/E.4), never a recommendation: TE cannot run it, so it needs the emulated backend.
PAPER_RHT_GEMMS = ("wgrad",)
PAPER_STOCHASTIC_ROLES = ("dgrad_grad_output", "wgrad_grad_output")
BACKENDS = ("auto", "emulated", "te")
PAPER_BF16_SHARE = 0.15
MAX_RHT_SIZE = 256  # the paper studied 16-128; larger sizes cost O(size) per element for nothing


@dataclass(frozen=True)
class NVFP4Recipe:
    """The paper's NVFP4 training recipe, frozen: what every converted layer computes with.

    The name is the method's (RHT on Wgrad, stochastic rounding of gradients, 2D weight tiles,
    BF16 blocks at the ends); ``format`` is the number format the method runs in. A comparison
    recipe (``format="fp8_block"``, ``"mxfp4"``) is the same method in another format, built with
    :meth:`for_format`, :func:`fp8_baseline` or :func:`mxfp4_paper`, which switch off what that
    format cannot honour. Every field has the paper's default:

    disable_rht / disable_stochastic_rounding / disable_2d_quantization: TE's flags; each
        turns off exactly its part of the recipe (RHT on Wgrad inputs, stochastic rounding
        of gradients, 16x16 weight tiles).
    rht_size: Hadamard size for the Wgrad operands (16; the paper found 16 as good as 128).
    bf16_first_blocks / bf16_last_blocks: whole transformer blocks kept in BF16. None for
        bf16_last_blocks means the paper's advice: about 15% of the blocks, at the end, at
        least one.
    modules_to_not_convert: module names, parent prefixes or glob patterns left in high
        precision (embeddings and the LM head never convert).
    backend: "auto" (Transformer Engine where it can train the format, else emulated),
        "emulated" or "te".
    format: "nvfp4", or a comparison format run through the same machinery
        ("mxfp4", "fp8_block", "fp8_tensor", "mxfp8", "bf16").
    seed: seed of the stochastic-rounding stream.
    rht_gemms / stochastic_roles: where RHT and stochastic rounding go. The defaults are the
        paper's (RHT on the Wgrad GEMM, SR on the two gradient operands); anything else is a
        negative control for ablations (emulated backend only).
    fused_global_scale: layers a serving engine fuses (q/k/v, gate/up, an expert's gate/up) share
        one weight tensor scale from their joint amax, so an export serves exactly the trained
        weights. False (default) is TE's per-layer scale.

    :class:`hf_nvfp4.NVFP4Config` (the HF quantization config) has exactly these fields. Change a
    converted model's recipe with :func:`hf_nvfp4.set_recipe`, never by mutation.

    >>> NVFP4Recipe(bf16_last_blocks=2).resolved_bf16_blocks(8)
    (0, 2)
    """

    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    rht_size: int = 16
    bf16_first_blocks: int = 0
    bf16_last_blocks: int | None = None
    modules_to_not_convert: tuple[str, ...] = ()
    backend: str = "auto"
    format: str = "nvfp4"
    seed: int = 0
    rht_gemms: tuple[str, ...] = PAPER_RHT_GEMMS
    stochastic_roles: tuple[str, ...] = PAPER_STOCHASTIC_ROLES
    fused_global_scale: bool = False

    def __post_init__(self) -> None:
        mods = self.modules_to_not_convert
        if mods is None:
            mods = ()
        elif isinstance(mods, str):
            mods = (mods,)
        if not isinstance(mods, (list, tuple)) or not all(isinstance(m, str) and m for m in mods):
            raise ValueError(
                f"modules_to_not_convert must be a list of module names, prefixes or glob patterns, got {mods!r}"
            )
        object.__setattr__(self, "modules_to_not_convert", tuple(mods))
        for name in ("rht_gemms", "stochastic_roles"):
            v = getattr(self, name)
            object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else v)
        _validate(self)

    def resolved_bf16_blocks(self, n_blocks: int) -> tuple[int, int]:
        """(first, last) block counts kept in BF16 for a model with ``n_blocks`` blocks."""
        if n_blocks == 0:
            return 0, 0
        last = self.bf16_last_blocks
        if last is None:
            last = max(1, round(PAPER_BF16_SHARE * n_blocks))
        first = min(self.bf16_first_blocks, n_blocks)
        return first, min(last, n_blocks - first)

    def replace(self, **changes) -> NVFP4Recipe:
        """A copy with ``changes`` applied and validated."""
        check_fields(changes, "NVFP4Recipe")
        return dataclasses.replace(self, **changes)

    @classmethod
    def for_format(cls, format: str, **changes) -> NVFP4Recipe:
        """The recipe for ``format`` with every option it cannot honour switched off (for baselines).

        >>> NVFP4Recipe.for_format("fp8_block").disable_stochastic_rounding
        True
        """
        fmt = get_format(format)
        off = {
            "disable_rht": not fmt.rht_sizes,
            "disable_stochastic_rounding": not fmt.stochastic,
            "disable_2d_quantization": fmt.weight_tile is None,
        }
        return cls(**{"format": format, **{k: v for k, v in off.items() if v}, **changes})

    def to_dict(self) -> dict:
        """Plain JSON types (tuples as lists), as in a checkpoint's ``quantization_config``."""
        d = dataclasses.asdict(self)
        for f in fields(self):
            if isinstance(d[f.name], tuple):
                d[f.name] = list(d[f.name])
        return d


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(NVFP4Recipe))


def check_fields(changes: dict, owner: str) -> None:
    """Refuse a key that is not a recipe field (a typo in a recipe file or a config.json), naming it."""
    unknown = sorted(set(changes) - set(FIELDS))
    if unknown:
        raise ValueError(f"{owner}: unknown field(s) {unknown}; valid fields are {sorted(FIELDS)}")


def _accepts(tp, v) -> bool:
    """``v`` is a value of the field type ``tp`` (bool is not an int here)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, v) for a in typing.get_args(tp))
    if tp is type(None):
        return v is None
    if origin is tuple:
        return isinstance(v, tuple) and all(_accepts(typing.get_args(tp)[0], x) for x in v)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, tp)


FIELD_TYPES: dict[str, object] = typing.get_type_hints(NVFP4Recipe)


def _validate(r: NVFP4Recipe) -> None:
    """Types from the field annotations, then ranges and names; every message names the field."""
    owner = "NVFP4Recipe"
    for name in (n for n, tp in FIELD_TYPES.items() if tp is bool):  # every flag, from its type
        if not _accepts(bool, getattr(r, name)):
            raise ValueError(f"{owner}.{name} must be True or False, got {getattr(r, name)!r}")
    v = r.rht_size
    if not _accepts(FIELD_TYPES["rht_size"], v) or v < 2 or v & (v - 1) or v > MAX_RHT_SIZE:
        raise ValueError(
            f"{owner}.rht_size must be a power of two from 2 to {MAX_RHT_SIZE} (the paper uses 16 and studied "
            f"16-128), got {v!r}"
        )
    for name in ("bf16_first_blocks", "bf16_last_blocks", "seed"):
        v = getattr(r, name)
        if not _accepts(FIELD_TYPES[name], v) or (v is not None and v < 0):
            allowed = "an int >= 0 or None (the paper's ~15%)" if name == "bf16_last_blocks" else "an int >= 0"
            raise ValueError(f"{owner}.{name} must be {allowed}, got {v!r}")
    if r.backend not in BACKENDS:
        raise ValueError(f"{owner}.backend must be one of {BACKENDS}, got {r.backend!r}")
    if r.format not in PRECISIONS:
        raise ValueError(f"{owner}.format must be one of {PRECISIONS}, got {r.format!r}")
    for name, allowed in (("rht_gemms", GEMMS), ("stochastic_roles", ROLES)):
        v = getattr(r, name)
        if not _accepts(FIELD_TYPES[name], v) or any(x not in allowed for x in v) or len(set(v)) != len(v):
            raise ValueError(
                f"{owner}.{name} must be a list of distinct names from {list(allowed)}, got {v!r} "
                f"(the paper's placement is {list(PAPER_RHT_GEMMS if name == 'rht_gemms' else PAPER_STOCHASTIC_ROLES)})"
            )


def as_recipe(obj=None) -> NVFP4Recipe:
    """An NVFP4Recipe from a recipe, anything with ``to_recipe()`` (NVFP4Config), a dict, or None.

    Called once, where a recipe enters (``convert_model``, ``NVFP4Linear``, ``set_recipe``);
    everything below takes the frozen recipe.
    """
    if obj is None:
        return NVFP4Recipe()
    if isinstance(obj, NVFP4Recipe):
        return obj
    if hasattr(obj, "to_recipe"):
        return obj.to_recipe()
    if isinstance(obj, dict):
        return NVFP4Recipe().replace(**{k: v for k, v in obj.items() if k != "quant_method"})
    raise TypeError(f"expected an NVFP4Config or NVFP4Recipe, got {type(obj).__name__}")


def check_format(recipe: NVFP4Recipe, format: str, what: str = "recipe") -> None:
    """Raise if ``format`` cannot honour every option of ``recipe`` (bf16 quantizes nothing: all moot)."""
    fmt = get_format(format)
    if not fmt.quantizes:
        return
    if not recipe.disable_rht:
        try:
            fmt.check_rht(recipe.rht_size, what)
        except ValueError as exc:
            raise ValueError(f"{exc}; set disable_rht=True or choose a format with RHT") from None
    if not recipe.disable_stochastic_rounding and not fmt.stochastic:
        raise ValueError(
            f"{what}: format {format!r} has no stochastic rounding; set disable_stochastic_rounding=True"
        )
    if recipe.fused_global_scale:
        if not fmt.per_tensor_amax:
            raise ValueError(
                f"{what}: format {format!r} has no per-tensor scale, so fused_global_scale has nothing to share; "
                "set fused_global_scale=False"
            )
        if not recipe.disable_rht and {"fprop", "dgrad"} & set(recipe.rht_gemms):
            raise ValueError(
                f"{what}: fused_global_scale shares the weight's tensor scale, but RHT on {list(recipe.rht_gemms)} "
                "puts the weight in another basis (a negative control); use one or the other"
            )
    if not recipe.disable_2d_quantization and fmt.weight_tile is None and fmt.act_tile is not None:
        raise ValueError(
            f"{what}: format {format!r} has no 2D weight scaling; set disable_2d_quantization=True"
        )


# -- the paper's comparison recipes ---------------------------------------------------------------
# FP8 baseline (arXiv 2509.25149): E4M3 with 1x128 activation/gradient blocks and 128x128 weight
# blocks; its 12B model (62 blocks) keeps the first block and the last 2 in BF16, about 5%. A
# 4-block model with "first 1 + last 2" would be 75% BF16, which mixes number format with layer
# allocation; so the allocation here is a *share* of the model's blocks (1/62 first, 2/62 last,
# rounded), or, with allocation="nvfp4", exactly the NVFP4 recipe's blocks (format alone differs).
# MXFP4 (the paper's section 5): 1x32 blocks with UE8M0 scales rounded up, a 32-point RHT on the
# Wgrad operands, otherwise the NVFP4 method (SR of gradients, 2D weight tiles: here 32x32).
PAPER_FP8_BLOCKS = 62  # the 12B model's blocks
PAPER_FP8_BF16_FIRST = 1  # of 62, kept in BF16 at the start
PAPER_FP8_BF16_LAST = 2  # of 62, kept in BF16 at the end
FP8_ALLOCATIONS = ("paper", "nvfp4")
MXFP4_RHT_SIZE = 32


def paper_fp8_bf16_blocks(n_blocks: int) -> tuple[int, int]:
    """(first, last) BF16 blocks of the FP8 baseline for ``n_blocks``: the paper's 1 + 2 of 62 as a share.

    >>> paper_fp8_bf16_blocks(62), paper_fp8_bf16_blocks(32), paper_fp8_bf16_blocks(4)
    ((1, 2), (1, 1), (0, 0))
    """
    if not isinstance(n_blocks, int) or n_blocks < 0:
        raise ValueError(f"n_blocks must be an int >= 0, got {n_blocks!r}")
    first = math.floor(n_blocks * PAPER_FP8_BF16_FIRST / PAPER_FP8_BLOCKS + 0.5)  # rounded half up
    last = math.floor(n_blocks * PAPER_FP8_BF16_LAST / PAPER_FP8_BLOCKS + 0.5)
    return first, min(last, n_blocks - first)


def fp8_baseline(n_blocks: int, allocation: str = "paper", like: NVFP4Recipe | None = None,
                 **changes) -> NVFP4Recipe:
    """The FP8 baseline recipe for a model of ``n_blocks`` blocks.

    allocation: ``"paper"`` (the paper's share of blocks in BF16, about 5%) or ``"nvfp4"`` (the
    BF16 blocks of ``like``, the NVFP4 recipe it is compared with, so that only the format differs).

    >>> fp8_baseline(4, "nvfp4", like=NVFP4Recipe(bf16_last_blocks=1)).resolved_bf16_blocks(4)
    (0, 1)
    """
    if allocation not in FP8_ALLOCATIONS:
        raise ValueError(f"FP8 baseline allocation must be one of {FP8_ALLOCATIONS}, got {allocation!r}")
    like = NVFP4Recipe() if like is None else like
    if allocation == "paper":
        first, last = paper_fp8_bf16_blocks(n_blocks)
    else:
        first, last = like.resolved_bf16_blocks(n_blocks)
    return NVFP4Recipe.for_format(
        "fp8_block", **{"bf16_first_blocks": first, "bf16_last_blocks": last, "seed": like.seed, **changes}
    )


def mxfp4_paper(like: NVFP4Recipe | None = None, **changes) -> NVFP4Recipe:
    """The paper's MXFP4 comparison: ``like`` (default: the NVFP4 recipe) in MXFP4 with a 32-point RHT."""
    base = NVFP4Recipe() if like is None else like
    return base.replace(**{"format": "mxfp4", "rht_size": MXFP4_RHT_SIZE, **changes})
