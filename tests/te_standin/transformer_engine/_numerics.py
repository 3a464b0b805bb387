"""TE STAND-IN numerics: a small, independent implementation of what TE's quantizers and GEMMs compute.

Written from NVIDIA/TransformerEngine at d0067d0da (2.20.0.dev0); every rule cites the TE
source it was read from (paths under transformer_engine/). No TE code is copied and nothing
here imports hf_nvfp4: the point is that "the TE path equals the emulation" compares two
implementations written apart.

Each quantizer returns a ``Q``: ``vals`` (fp32 element values times their block scale,
exact) and ``g`` (the per-tensor factor the GEMM applies, fp32 scalar; 1 where there is none).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLT_MAX = torch.finfo(torch.float32).max
E4M3_MAX = 448.0
E2M1_MAX = 6.0
# pytorch/custom_recipes/reference_nvfp4.py:335-340: the fixed sign vector of TE's 16-point RHT
# (data, not code: the transform is a different one without these signs).
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


@dataclass
class Q:
    vals: torch.Tensor  # [rows, cols] fp32: element value x block scale
    g: torch.Tensor  # fp32 scalar factor, applied once per GEMM (alpha)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# ----------------------------------------------------------------------------- E2M1


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_nearest(a: torch.Tensor) -> torch.Tensor:
    """|a| in [0, 6] to the nearest E2M1 magnitude, ties to the even code.

    reference_nvfp4.py:49-71 (cast_to_fp4x2): the interval table puts 0.25 -> 0, 0.75 -> 1,
    1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4 and 5 -> 4, i.e. ties to the even code.
    """
    grid = _E2M1.to(a.device)
    d = (a.unsqueeze(-1) - grid).abs()
    best = d.min(dim=-1, keepdim=True).values
    # among equally near grid points take the even index (the even code)
    cand = torch.where(d == best, torch.arange(8, device=a.device), 99)
    even = torch.where(cand % 2 == 0, cand, 99).min(dim=-1).values
    odd = cand.min(dim=-1).values
    idx = torch.where(even < 99, even, odd)
    return grid[idx]


def e2m1_stochastic(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Unbiased stochastic rounding of |a| in [0, 6] between its two neighbouring E2M1 values.

    TE draws the bits from the default CUDA generator's Philox stream (csrc/quantizer.cpp:2606-2621,
    ``quant_config.set_stochastic_rounding``); the stand-in draws ``u`` from the default torch
    generator, so only the distribution, not the stream, is TE's.
    """
    grid = _E2M1.to(a.device)
    hi_i = torch.searchsorted(grid, a.contiguous(), right=False).clamp(max=7)
    lo_i = torch.where(grid[hi_i] == a, hi_i, (hi_i - 1).clamp(min=0))
    lo, hi = grid[lo_i], grid[hi_i]
    p = torch.where(hi > lo, (a - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)
    return torch.where(u < p, hi, lo)


# ----------------------------------------------------------------------------- NVFP4


def rht16(x: torch.Tensor) -> torch.Tensor:
    """TE's 16-point random Hadamard transform along the last dim, rounded to x's dtype.

    reference_nvfp4.py:395-447: rows of the Sylvester matrix times the sign vector, scaled by
    1/4, applied blockwise to the columnwise (transposed) operand; fp32 accumulation, then x's
    dtype (bf16: csrc/quantizer.cpp:2630-2633 admits no other).
    """
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = torch.tensor(RHT_SIGNS, dtype=torch.float32).unsqueeze(1) * h * 0.25
    rows, cols = x.shape
    out = x.float().reshape(-1, 16) @ h.to(x.device)
    return out.reshape(rows, cols).to(x.dtype)


def nvfp4(x: torch.Tensor, tile=(1, 16), stochastic: bool = False) -> Q:
    """NVFP4 quantization of a 2D tensor, blocks along the last dim (reference_nvfp4.py:650-777).

    global amax over the tensor (:892); s_enc = 448*6 / amax, min FLT_MAX, 1 where 0 (:712-729);
    s_dec = 1 / s_enc (:730); block scale = e4m3(clamp(vmax * (s_enc * fp32(1/6)), 448)) with
    vmax over 1x16 or 16x16 (:677-692, :748-762); encode = min(1 / (scale * s_dec), FLT_MAX)
    (:764-771); elements E2M1(clamp(x * encode, +-6)) (:773-777). The GEMM factor is
    amax / (6 * 448) per operand (qgemm, :1170-1189).
    """
    x = x.float()
    rows, cols = x.shape
    amax = x.abs().max() if x.numel() else torch.zeros(())
    s_enc = torch.clamp(_f32(E4M3_MAX * E2M1_MAX) / amax, max=FLT_MAX)
    s_enc = torch.where(s_enc == 0, _f32(1.0), s_enc)
    s_dec = torch.div(1.0, s_enc)
    mult = s_enc * torch.reciprocal(_f32(E2M1_MAX))
    if tile == (16, 16):
        blocks = x.reshape(rows // 16, 16, cols // 16, 16)
        vmax = blocks.abs().amax(dim=(1, 3), keepdim=True).expand(-1, 16, -1, 1).reshape(rows, cols // 16, 1)
    else:
        vmax = x.reshape(rows, cols // 16, 16).abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(torch.clamp(vmax * mult, max=FLT_MAX), -E4M3_MAX, E4M3_MAX)
    scale = scale.to(torch.float8_e4m3fn).float()
    enc = torch.clamp(torch.div(1.0, scale * s_dec), max=FLT_MAX)
    v = x.reshape(rows, cols // 16, 16) * enc
    a = torch.clamp(v.abs(), max=E2M1_MAX)
    q = e2m1_stochastic(a, torch.rand(a.shape, device=a.device)) if stochastic else e2m1_nearest(a)
    q = torch.where(v < 0, -q, q)
    return Q((q * scale).reshape(rows, cols), amax / (E2M1_MAX * E4M3_MAX))


# ----------------------------------------------------------------------------- FP8 and MXFP8


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(v, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def fp8_scale(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """common/recipe/recipe_common.cuh:14-49 (compute_scale_from_amax, eps 0): 448 / amax rounded
    to nearest (__fdiv_rn), 1 where amax is 0; an infinite scale becomes FLT_MAX; power-of-two
    scales keep only the sign and exponent bits."""
    s = torch.div(_f32(E4M3_MAX), amax)
    s = torch.where(torch.isinf(s), _f32(FLT_MAX), s)
    if pow2:
        s = (s.view(torch.int32) & -8388608).view(torch.float32)  # 0xFF800000
    return torch.where(amax == 0, _f32(1.0), s)


def fp8_tensor(x: torch.Tensor) -> Q:
    """Float8CurrentScaling: one scale per tensor; the GEMM applies 1/scale (scale_inv) per operand."""
    x = x.float()
    s = fp8_scale(x.abs().max(), pow2=False)
    return Q(_e4m3(x * s), torch.div(1.0, s))


def fp8_block(x: torch.Tensor, tile, pow2: bool) -> Q:
    """Float8BlockScaling: 1x128 or 128x128 blocks (common/recipe/__init__.py:392-486), scale per
    block from compute_scale_from_amax; values returned already times scale_inv (exact for pow2)."""
    x = x.float()
    rows, cols = x.shape
    th, tw = tile
    pr, pc = (-rows) % th, (-cols) % tw
    xp = torch.nn.functional.pad(x, (0, pc, 0, pr))
    b = xp.reshape((rows + pr) // th, th, (cols + pc) // tw, tw)
    s = fp8_scale(b.abs().amax(dim=(1, 3), keepdim=True), pow2)
    vals = (_e4m3(b * s) * torch.div(1.0, s)).reshape(rows + pr, cols + pc)[:rows, :cols]
    return Q(vals, _f32(1.0))


def mxfp8(x: torch.Tensor) -> Q:
    """MXFP8, 1x32 blocks: the scale exponent is that of amax * fp32(1/448) rounded up
    (cast/mxfp8/quantize_mxfp8.cuh:271 and util/ptx_arch_spec.cuh:72-102, cvt.rp to UE8M0);
    elements e4m3(x * 2^-e) (exp2f_rcp, quantize_mxfp8.cuh:283)."""
    x = x.float()
    rows, cols = x.shape
    b = x.reshape(rows, cols // 32, 32)
    d = b.abs().amax(dim=-1, keepdim=True) * torch.reciprocal(_f32(E4M3_MAX))
    bits = d.view(torch.int32)
    e = (bits >> 23) & 0xFF
    e = torch.where(((bits & 0x7FFFFF) > 0) & (e != 0xFE) & ~((e == 0) & ((bits & 0x7FFFFF) <= 0x400000)), e + 1, e)
    scale = torch.ldexp(torch.ones_like(d), (e - 127).to(torch.int32))
    return Q((_e4m3(b / scale) * scale).reshape(rows, cols), _f32(1.0))


# ----------------------------------------------------------------------------- GEMM


def gemm(a: Q, b: Q, out_dtype: torch.dtype) -> torch.Tensor:
    """``a.vals @ b.vals^T`` as a block-scaled tensor-core GEMM: fp32 accumulation, alpha
    (the operands' per-tensor factors) applied in fp32 in the epilogue, one rounding to
    ``out_dtype`` (reference_nvfp4.py:1215-1249, qgemm). The accumulation order is not modelled."""
    with torch.autocast(a.vals.device.type, enabled=False):
        y = a.vals @ b.vals.t()
    return (y * (a.g * b.g)).to(out_dtype)
