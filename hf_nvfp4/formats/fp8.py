"""FP8 E4M3 with TE's current scaling: per block (the paper's FP8 baseline) or per tensor.

Scale (TE's ``scale_from_amax``, eps = 0): ``scale = 448 / amax``; an infinite scale
becomes FLT_MAX; with power-of-two scales it is rounded down to 2^floor(log2 scale);
amax == 0 gives scale 1. Elements are ``e4m3(clamp(x * scale, +-448))`` and dequantize
as ``q * (1 / scale)``.

- ``fp8_block``: 1x128 blocks (activations, gradients) or 128x128 (weights); power-of-two
  scales by default as in TE (``NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1`` or
  ``pow2_scales=False`` keeps fp32 scales)
- ``fp8_tensor``: one scale for the whole tensor, fp32 (``Float8CurrentScaling``)
"""

from __future__ import annotations

import os

import torch

from ._common import E4M3_MAX, FLT_MAX, as_2d, check_amax, check_input, check_tile, pad_2d, shape_2d
from ._compile import fused
from .quantized import BlockQuantized

FP8_BLOCK_TILES = ((1, 128), (128, 128))


def _scale_from_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = torch.div(E4M3_MAX, amax)
    scale = torch.where(scale == float("inf"), torch.full_like(scale, FLT_MAX), scale)
    if pow2:
        _, exp = torch.frexp(scale)
        scale = torch.where(amax == float("inf"), torch.zeros_like(scale), torch.ldexp(torch.ones_like(scale), exp - 1))
    return torch.where(amax == 0, torch.ones_like(scale), scale)


def _cast(xb, scale, dtype, dequant: bool):
    q = torch.clamp(xb.float() * scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * torch.reciprocal(scale)).to(dtype) if dequant else q


@fused(dims=(0, 2))
def _block_amax(xb: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return xb.abs().amax(dim=dims, keepdim=True).float()


@fused(dims=(0, 2))
def _block_cast(xb, scale, dtype, dequant: bool):
    return _cast(xb, scale, dtype, dequant)


def default_pow2_scales() -> bool:
    return os.environ.get("NVTE_FP8_BLOCK_SCALING_FP32_SCALES", "0") != "1"


def _fp8_block(x, tile, pow2_scales, dequant, fn):
    x = check_input(x, fn)
    tile = check_tile(tile, FP8_BLOCK_TILES, fn)
    pow2 = default_pow2_scales() if pow2_scales is None else bool(pow2_scales)
    x2 = pad_2d(as_2d(x.detach()), tile, fn)
    m, k = x2.shape
    if tile == (1, 128):
        xb, dims = x2.view(-1, 128), (1,)
    else:
        xb, dims = x2.view(m // 128, 128, k // 128, 128), (1, 3)
    scale = _scale_from_amax(_block_amax(xb, dims), pow2)
    out = _block_cast(xb, scale, x.dtype, dequant).reshape(m, k)
    rows, cols = shape_2d(x)
    if dequant:
        return out[:rows, :cols].reshape(x.shape)
    scale_rows = rows if tile == (1, 128) else -(-rows // 128)
    scale_inv = torch.reciprocal(scale).reshape(m // tile[0], k // 128)[:scale_rows]  # (-1, 0) fails for K = 0
    return BlockQuantized("e4m3", out[:rows], scale_inv, x.shape, tile)


def quantize_fp8_block(x: torch.Tensor, *, tile=(1, 128), pow2_scales: bool | None = None) -> BlockQuantized:
    """FP8 E4M3 with one scale per 1x128 block or 128x128 tile (TE ``Float8BlockScaling``)."""
    return _fp8_block(x, tile, pow2_scales, False, "quantize_fp8_block")


def fake_quantize_fp8_block(x: torch.Tensor, *, tile=(1, 128), pow2_scales: bool | None = None) -> torch.Tensor:
    return _fp8_block(x, tile, pow2_scales, True, "fake_quantize_fp8_block")


def _fp8_tensor(x, amax, dequant, fn):
    x = check_input(x, fn)
    amax = check_amax(amax, fn)
    if amax is None:
        amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), device=x.device)
    scale = _scale_from_amax(amax.to(x.device), pow2=False)
    out = _block_cast(x.detach(), scale, x.dtype, dequant)
    if dequant:
        return out
    return BlockQuantized("e4m3", as_2d(out), torch.reciprocal(scale).reshape(1, 1), x.shape, None)


def quantize_fp8_tensor(x: torch.Tensor, *, amax=None) -> BlockQuantized:
    """FP8 E4M3 with one fp32 scale for the whole tensor (TE ``Float8CurrentScaling``)."""
    return _fp8_tensor(x, amax, False, "quantize_fp8_tensor")


def fake_quantize_fp8_tensor(x: torch.Tensor, *, amax=None) -> torch.Tensor:
    return _fp8_tensor(x, amax, True, "fake_quantize_fp8_tensor")
