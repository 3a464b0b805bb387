"""NVFP4Linear, model conversion, layer selection and precision switching."""

from .convert import convert_model, find_blocks, plan_conversion, set_precision, unconvert_model
from .linear import NVFP4Linear, RecipeState

__all__ = [
    "NVFP4Linear",
    "RecipeState",
    "convert_model",
    "find_blocks",
    "plan_conversion",
    "set_precision",
    "unconvert_model",
]
