"""NVFP4Linear, model conversion, layer selection and precision switching."""

from .convert import (
    convert_model,
    find_blocks,
    module_matches,
    plan_conversion,
    set_precision,
    set_recipe,
    unconvert_model,
)
from .linear import NVFP4Linear, NVFP4State, RecipeState

__all__ = [
    "NVFP4Linear",
    "NVFP4State",
    "RecipeState",
    "convert_model",
    "find_blocks",
    "module_matches",
    "plan_conversion",
    "set_precision",
    "set_recipe",
    "unconvert_model",
]
