"""MX formats with power-of-two UE8M0 block scales and no per-tensor scale.

- ``mxfp4``: E2M1 elements, 1x32 blocks, scale = 2^ceil(log2(vmax / 6))   (TE's reference)
- ``mxfp8``: E4M3 elements, 1x32 blocks, scale = 2^ceil(log2(vmax * fp32(1/448)))
  (TE's MXFP8 kernel: multiply by the reciprocal, round the scale up to a power of two)

``tile=(32, 32)`` gives 2D weight scaling (one scale per 32x32 tile, the MX analogue of NVFP4's
16x16 tiles): the tile's scale is repeated onto its 32 rows, so the stored scales stay [M, K/32].

The exponent is clamped to [-127, 127] and read exactly from the fp32 bits, so a value a
hair above a power of two always rounds the scale up (``torch.log2`` can round to an
integer there). Scales are stored as biased exponents (UE8M0 bits, uint8).
"""

from __future__ import annotations

import torch

from . import _random
from ._common import E4M3_MAX, as_2d, check_generator, check_input, check_tile, pad_2d
from ._compile import fused
from .e2m1 import codes_from_values, pack_nibbles, round_e2m1, round_e2m1_stochastic, signed
from .quantized import BlockQuantized

MX_TILES = ((1, 32), (32, 32))


def ceil_log2_exponent(d: torch.Tensor) -> torch.Tensor:
    """Exact ceil(log2(d)) for fp32 d >= 0, clamped to [-127, 127] (int32). NaN -> 128."""
    bits = d.view(torch.int32)
    e = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    normal = e - 127 + (mant != 0).to(torch.int32)
    sub = torch.where(mant > (1 << 22), -126, -127)  # subnormals: d in (2^-127, 2^-126] -> -126
    exp = torch.clamp(torch.where(e == 0, sub, normal), -127, 127)
    return torch.where(torch.isnan(d), 128, exp)


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    """2^exp as fp32 for exp in [-127, 127]; 128 (NaN marker) -> NaN."""
    return torch.where(exp == 128, float("nan"), torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp))


@fused
def _mx_scales(vmax: torch.Tensor, elem_max_rcp: float, use_div: bool):
    d = vmax / (1.0 / elem_max_rcp) if use_div else vmax * elem_max_rcp
    exp = ceil_log2_exponent(d)
    return exp, _pow2(exp)


@fused
def _mxfp4_apply(xb, scale, seeds, dtype, dequant: bool):
    v = torch.clamp(xb.float() * torch.reciprocal(scale), -6.0, 6.0)
    a = v.abs()
    if seeds is None:
        q = round_e2m1(a)
    else:
        q = round_e2m1_stochastic(a, _random.hashed_uniform(seeds, a.shape, a.device))
    if dequant:
        return (signed(q, v) * scale).to(dtype)
    return codes_from_values(q, v)


@fused
def _mxfp8_apply(xb, scale, dtype, dequant: bool):
    q = torch.clamp(xb.float() * torch.reciprocal(scale), -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(dtype) if dequant else q


def _mx(x, elem: str, tile, stochastic, generator, dequant, fn):
    x = check_input(x, fn)
    tile = check_tile(tile, MX_TILES, fn)
    generator = check_generator(generator, fn)
    if stochastic and elem != "e2m1":
        raise ValueError(f"{fn}: stochastic rounding is implemented for the FP4 formats only")
    x2 = pad_2d(as_2d(x.detach()), tile, fn)
    m, k = x2.shape
    xb = x2.view(-1, 32)
    if tile == (32, 32):  # one amax per 32x32 tile, repeated onto the tile's rows
        vmax = x2.view(m // 32, 32, k // 32, 32).abs().amax(dim=(1, 3), keepdim=True).float()
        vmax = vmax.expand(-1, 32, -1, -1).reshape(-1, 1)
    else:
        vmax = xb.abs().amax(-1, keepdim=True).float()
    if elem == "e2m1":
        exp, scale = _mx_scales(vmax, 1.0 / 6.0, True)
        seeds = _random.draw_seeds(generator, x.device) if stochastic else None
        out = _mxfp4_apply(xb, scale, seeds, x.dtype, dequant)
    else:
        exp, scale = _mx_scales(vmax, float(torch.tensor(1.0 / E4M3_MAX, dtype=torch.float32)), False)
        out = _mxfp8_apply(xb, scale, x.dtype, dequant)
    rows, cols = as_2d(x).shape
    if dequant:
        return out.reshape(m, k)[:rows, :cols].reshape(x.shape)
    data = out.reshape(m, k)
    if elem == "e2m1":
        data = pack_nibbles(data)
    biased = torch.where(exp == 128, 255, exp + 127).to(torch.uint8).view(m, k // 32)
    # scales stay one per row of 1x32 blocks (a 2D tile's scale repeated on its rows)
    return BlockQuantized(elem, data[:rows], biased[:rows], x.shape, (1, 32), scale_kind="ue8m0")


def quantize_mxfp4(x: torch.Tensor, *, tile=(1, 32), stochastic: bool = False, generator=None) -> BlockQuantized:
    """MXFP4: E2M1 codes (packed like NVFP4's) and UE8M0 scales [M, K/32]."""
    return _mx(x, "e2m1", tile, stochastic, generator, False, "quantize_mxfp4")


def fake_quantize_mxfp4(x: torch.Tensor, *, tile=(1, 32), stochastic: bool = False, generator=None) -> torch.Tensor:
    return _mx(x, "e2m1", tile, stochastic, generator, True, "fake_quantize_mxfp4")


def quantize_mxfp8(x: torch.Tensor, *, tile=(1, 32), stochastic: bool = False, generator=None) -> BlockQuantized:
    """MXFP8: float8_e4m3fn elements and UE8M0 scales [M, K/32]."""
    return _mx(x, "e4m3", tile, stochastic, generator, False, "quantize_mxfp8")


def fake_quantize_mxfp8(x: torch.Tensor, *, tile=(1, 32), stochastic: bool = False, generator=None) -> torch.Tensor:
    return _mx(x, "e4m3", tile, stochastic, generator, True, "fake_quantize_mxfp8")
