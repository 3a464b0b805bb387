"""The recipe (a frozen dataclass) and the one role table that turns it into quantizers.

A Linear's three GEMMs have six operands (the paper's words)::

    fprop  y  = x  . W^T     roles fprop_input, fprop_weight
    dgrad  dx = dy . W       roles dgrad_grad_output, dgrad_weight
    wgrad  dW = dy^T . x     roles wgrad_grad_output, wgrad_input

:func:`quantizer_for` decides, for each role, the tile, the RHT and stochastic rounding, like TE's
per-role quantizer factory; the format registry says what each format can do. An option a
format cannot honour is an error here, never silently dropped.

>>> from hf_nvfp4.ops.recipe import NVFP4Recipe, quantizer_for
>>> quantizer_for(NVFP4Recipe(), "wgrad_input")
QuantizerSpec(format='nvfp4', tile=(1, 16), rht=True, rht_size=16, stochastic=False)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from ..formats.registry import PRECISIONS, get_format

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

    The same fields as :class:`hf_nvfp4.NVFP4Config` (the HF quantization config, which converts
    to this with ``to_recipe()``). Change a converted model's recipe with
    :func:`hf_nvfp4.set_recipe`, never by mutation.

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
        validate_fields(self, "NVFP4Recipe")

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
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"NVFP4Recipe: unknown field(s) {unknown}; valid fields are {sorted(known)}")
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
        d = dataclasses.asdict(self)
        for name in ("modules_to_not_convert", "rht_gemms", "stochastic_roles"):
            d[name] = list(getattr(self, name))
        return d

    def paper_placement(self) -> bool:
        """RHT and stochastic rounding where the paper puts them (not a negative control)."""
        return tuple(self.rht_gemms) == PAPER_RHT_GEMMS and sorted(self.stochastic_roles) == sorted(
            PAPER_STOCHASTIC_ROLES
        )


def validate_fields(obj, owner: str) -> None:
    """Type and range checks shared by NVFP4Recipe and NVFP4Config (same field names)."""
    for name in ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization", "fused_global_scale"):
        if not isinstance(getattr(obj, name, False), bool):
            raise ValueError(f"{owner}.{name} must be True or False, got {getattr(obj, name)!r}")
    r = obj.rht_size
    if not isinstance(r, int) or isinstance(r, bool) or r < 2 or r & (r - 1) or r > MAX_RHT_SIZE:
        raise ValueError(
            f"{owner}.rht_size must be a power of two from 2 to {MAX_RHT_SIZE} (the paper uses 16 and studied "
            f"16-128), got {r!r}"
        )
    for name in ("bf16_first_blocks", "bf16_last_blocks", "seed"):
        v = getattr(obj, name)
        if v is None and name == "bf16_last_blocks":
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            allowed = "an int >= 0 or None (the paper's ~15%)" if name == "bf16_last_blocks" else "an int >= 0"
            raise ValueError(f"{owner}.{name} must be {allowed}, got {v!r}")
    if obj.backend not in BACKENDS:
        raise ValueError(f"{owner}.backend must be one of {BACKENDS}, got {obj.backend!r}")
    if obj.format not in PRECISIONS:
        raise ValueError(f"{owner}.format must be one of {PRECISIONS}, got {obj.format!r}")
    for name, allowed in (("rht_gemms", GEMMS), ("stochastic_roles", ROLES)):
        v = getattr(obj, name)
        if not isinstance(v, (list, tuple)) or any(x not in allowed for x in v) or len(set(v)) != len(v):
            raise ValueError(
                f"{owner}.{name} must be a list of distinct names from {list(allowed)}, got {v!r} "
                f"(the paper's placement is {list(PAPER_RHT_GEMMS if name == 'rht_gemms' else PAPER_STOCHASTIC_ROLES)})"
            )


def as_recipe(obj=None) -> NVFP4Recipe:
    """An NVFP4Recipe from a recipe, anything with ``to_recipe()`` (NVFP4Config), a dict, or None."""
    if obj is None:
        return NVFP4Recipe()
    if isinstance(obj, NVFP4Recipe):
        return obj
    if hasattr(obj, "to_recipe"):
        return obj.to_recipe()
    if isinstance(obj, dict):
        return NVFP4Recipe().replace(**{k: v for k, v in obj.items() if k != "quant_method"})
    raise TypeError(f"expected an NVFP4Config or NVFP4Recipe, got {type(obj).__name__}")


@dataclass(frozen=True)
class QuantizerSpec:
    """How one GEMM operand is quantized. ``format="bf16"``: not at all.

    tile: block shape with blocks along the GEMM's inner dim (a square 2D tile for weights).
    """

    format: str
    tile: tuple[int, int] | None
    rht: bool
    rht_size: int
    stochastic: bool


def check_format(recipe, format: str, what: str = "recipe") -> None:
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
    if getattr(recipe, "fused_global_scale", False):
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


def quantizer_for(recipe: NVFP4Recipe, role: str, format: str | None = None) -> QuantizerSpec:
    """The role table: the quantizer for ``role`` of a Linear computing in ``format`` (default: the recipe's)."""
    if role not in ROLES:
        raise ValueError(f"unknown GEMM operand role {role!r}; roles are {ROLES}")
    fmt = get_format(format or recipe.format)
    if not fmt.quantizes:
        return QuantizerSpec(fmt.name, None, False, recipe.rht_size, False)
    weight = role.endswith("weight")
    # The paper: RHT on both Wgrad operands only, SR on the gradients only (recipe.rht_gemms and
    # recipe.stochastic_roles move them, for negative controls). A transformed GEMM needs both
    # operands in the same basis, so a weight under RHT takes 1D blocks along that GEMM's inner dim.
    rht = role.split("_")[0] in recipe.rht_gemms and not recipe.disable_rht
    stochastic = role in recipe.stochastic_roles and not recipe.disable_stochastic_rounding
    two_d = weight and not recipe.disable_2d_quantization and fmt.weight_tile is not None and not rht
    tile = fmt.weight_tile if two_d else fmt.act_tile
    return QuantizerSpec(fmt.name, tile, rht, recipe.rht_size, stochastic)


def role_table(recipe: NVFP4Recipe, fprop: str | None = None, backward: str | None = None) -> dict[str, QuantizerSpec]:
    """All six roles: Fprop in ``fprop``, Dgrad and Wgrad in ``backward`` (both default to the recipe's format)."""
    fprop = fprop or recipe.format
    backward = backward or recipe.format
    return {r: quantizer_for(recipe, r, fprop if r.startswith("fprop") else backward) for r in ROLES}
