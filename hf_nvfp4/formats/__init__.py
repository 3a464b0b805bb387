"""Pure numerics: NVFP4 and the formats it is compared against (no torch.nn here)."""

from .fp8 import fake_quantize_fp8_block, fake_quantize_fp8_tensor, quantize_fp8_block, quantize_fp8_tensor
from .hadamard import hadamard_matrix, hadamard_transform
from .mx import fake_quantize_mxfp4, fake_quantize_mxfp8, quantize_mxfp4, quantize_mxfp8
from .nvfp4 import NVFP4Tensor, fake_quantize_nvfp4, quantize_nvfp4
from .quantized import BlockQuantized
from .registry import FORMATS, Format, get_format

__all__ = [
    "FORMATS",
    "BlockQuantized",
    "Format",
    "NVFP4Tensor",
    "fake_quantize_fp8_block",
    "fake_quantize_fp8_tensor",
    "fake_quantize_mxfp4",
    "fake_quantize_mxfp8",
    "fake_quantize_nvfp4",
    "get_format",
    "hadamard_matrix",
    "hadamard_transform",
    "quantize_fp8_block",
    "quantize_fp8_tensor",
    "quantize_mxfp4",
    "quantize_mxfp8",
    "quantize_nvfp4",
]
