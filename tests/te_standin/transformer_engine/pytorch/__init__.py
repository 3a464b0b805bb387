"""TE stand-in: transformer_engine/pytorch/__init__.py, the names the adapter uses."""

from .module import Linear
from .quantization import (
    autocast,
    fp8_autocast,
    is_fp8_available,
    is_fp8_block_scaling_available,
    is_mxfp8_available,
    is_nvfp4_available,
)

__all__ = [
    "Linear",
    "autocast",
    "fp8_autocast",
    "is_fp8_available",
    "is_fp8_block_scaling_available",
    "is_mxfp8_available",
    "is_nvfp4_available",
]
