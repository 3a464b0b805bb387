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

# MoE experts and the coverage report (issue 17) hook into every conversion when imported.
from . import experts as _experts  # noqa: E402, F401  (isort: skip)
from . import coverage as _coverage  # noqa: E402, F401  (isort: skip)
from . import fused as _fused  # noqa: E402, F401  (isort: skip)  fused_global_scale's groups

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
