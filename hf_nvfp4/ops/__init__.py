"""Autograd functions for the three GEMMs of a Linear layer (Fprop, Dgrad, Wgrad), and the role table."""

from __future__ import annotations

from ..config import ROLES, NVFP4Recipe, QuantizerSpec, as_recipe, check_format, quantizer_for, role_table
from .linear import GemmPlan, quantized_linear


def GemmRecipe(fprop: str = "nvfp4", backward: str = "nvfp4", rht: bool = True, stochastic: bool = True,  # noqa: N802
               two_d: bool = True, rht_size: int = 16, generator=None) -> GemmPlan:
    """Deprecated spelling of :meth:`GemmPlan.from_recipe` (kept so older code runs)."""
    recipe = NVFP4Recipe(disable_rht=not rht, disable_stochastic_rounding=not stochastic,
                         disable_2d_quantization=not two_d, rht_size=rht_size)
    return GemmPlan.from_recipe(recipe, fprop, backward, generator)


__all__ = [
    "ROLES",
    "GemmPlan",
    "GemmRecipe",
    "NVFP4Recipe",
    "QuantizerSpec",
    "as_recipe",
    "check_format",
    "quantized_linear",
    "quantizer_for",
    "role_table",
]
