"""The role table: which quantizer each of a Linear's six GEMM operands gets, from the recipe.

:func:`quantizer_for` decides, for each role, the tile, the RHT and stochastic rounding, like TE's
per-role quantizer factory; the format registry says what each format can do.

>>> from hf_nvfp4.config import NVFP4Recipe
>>> quantizer_for(NVFP4Recipe(), "wgrad_input")
QuantizerSpec(format='nvfp4', tile=(1, 16), rht=True, rht_size=16, stochastic=False)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ROLES, NVFP4Recipe
from ..formats.registry import get_format


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
