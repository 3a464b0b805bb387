"""FP4 E2M1 element rounding, codes and nibble packing (pure tensor math, no nn).

Magnitudes by code 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the sign. Every function
here is written with elementwise ops only so that torch.compile can fuse it.
"""

from __future__ import annotations

import torch

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """Round fp32 magnitudes in [0, 6] to the E2M1 grid, ties to the even code (NaN stays NaN).

    Grid 0, 0.5, 1, 1.5, 2, 3, 4, 6; each midpoint goes to the even code: 0.25->0, 0.75->1,
    1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4. The grid step is 0.5 below 2, 1 below 4, else 2, so
    adding and subtracting ``1.5 * 2^23 * step`` rounds to a multiple of the step, ties to even, and
    an even multiple is an even code. The step comes from two compares (no bit casts, which
    inductor's CPU code does lane by lane): 2 compares, 2 selects and 3 arithmetic ops per element
    instead of 7 compare-and-select pairs.
    """
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    magic = step * (1.5 * 2**23)
    return (a + magic) - magic


def round_e2m1_stochastic(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Round magnitudes in [0, 6] up to the next grid point with probability (a-lo)/(hi-lo).

    ``u`` holds uniform samples in [0, 1). Only the two neighbours of ``a`` can come out,
    and a value already on the grid is returned unchanged. The grid step is 0.5 below 2, 1 in
    [2, 4) and 2 from 4: ``a`` is scaled to steps of 1 by a power of two (exact), split into
    floor and fraction, and scaled back.
    """
    up = torch.where(a < 2.0, 2.0, torch.where(a < 4.0, 1.0, 0.5))
    t = a * up
    lo = torch.floor(t)
    return (lo + (u < t - lo).to(torch.float32)) * torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))


def signed(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Give magnitude ``q`` the sign of ``v`` the way TE's codes do: -0.0 stays +0."""
    return torch.where(v < 0, -q, q)


def _code_values(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes as fp32 (0..15) of grid magnitudes ``q`` with the sign of ``v``; NaN -> 0 (as TE).

    Float arithmetic throughout (m = 2q in {0,1,2,3,4,6,8,12} -> code), which fuses and
    vectorizes far better than uint8 compare chains.
    """
    m = q * 2.0
    code = torch.where(m <= 4.0, m, torch.where(m <= 8.0, m * 0.5 + 2.0, 7.0))
    code = torch.where(m == m, code, 0.0)
    return code + torch.where(v < 0, 8.0, 0.0)


def codes_from_values(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) of grid magnitudes ``q`` with the sign of ``v``. NaN gives code 0."""
    return _code_values(q, v).to(torch.uint8)


def packed_codes(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Codes packed two a byte along the last dim (even index in the low nibble): [..., K] -> [..., K/2]."""
    code = _code_values(q, v)
    pairs = code.view(*code.shape[:-1], code.shape[-1] // 2, 2)
    return (pairs[..., 0] + pairs[..., 1] * 16.0).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes [..., K] (K even) into bytes [..., K/2], even index in the low nibble."""
    pairs = codes.view(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: bytes [..., K/2] -> codes [..., K]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).view(*packed.shape[:-1], packed.shape[-1] * 2)


def values_from_codes(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Signed E2M1 values of integer codes 0..15 (code 8 is -0.0): the one decoder.

    Arithmetic, not a table lookup, so that it fuses into the unpacking kernels (magnitude
    code m: m / 2 up to 4, then 3, 4, 6).
    """
    mag = (codes & 7).to(torch.float32)
    val = torch.where(mag <= 4.0, mag * 0.5, torch.where(mag == 7.0, 6.0, mag - 2.0))
    return torch.where(codes >= 8, -val, val).to(dtype)
