"""NVFP4Linear, model conversion, layer selection and precision switching."""

from .convert import (
    SCOPES,
    convert_model,
    find_blocks,
    module_matches,
    plan_conversion,
    set_precision,
    set_recipe,
    temporary_precision,
    unconvert_model,
)
from .linear import NVFP4Linear, NVFP4State

# MoE experts and the coverage report hook into every conversion when imported.
from . import experts as _experts  # noqa: E402, F401  (isort: skip)
from . import coverage as _coverage  # noqa: E402, F401  (isort: skip)
from . import fused as _fused  # noqa: E402, F401  (isort: skip)  fused_global_scale's groups

__all__ = [
    "SCOPES",
    "NVFP4Linear",
    "NVFP4State",
    "convert_model",
    "find_blocks",
    "module_matches",
    "plan_conversion",
    "set_precision",
    "set_recipe",
    "temporary_precision",
    "unconvert_model",
]
