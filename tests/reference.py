"""An independent, slow reference for the formats, written from the spec with numpy.

Nothing here calls hf_nvfp4: scalars and blocks are computed in numpy float32, the E4M3
and E2M1 roundings by searching the full value tables (ties to the even code), so the
fast torch kernels are checked against a different formulation.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float64)
SIGNS = np.array([1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1], dtype=np.float64)


def _e4m3_table() -> np.ndarray:
    vals = []
    for code in range(127):  # positive codes, 127 (0x7F) is NaN
        e, m = code >> 3, code & 7
        vals.append(m * 2.0**-9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


E4M3 = _e4m3_table()


def nearest_even(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table entry to each value; ties to the even index."""
    v = values.astype(np.float64)[..., None]
    d = np.abs(v - table)
    best = d.min(-1, keepdims=True)
    cand = d == best
    idx = np.argmax(cand, -1)
    two = cand.sum(-1) > 1
    odd = idx % 2 == 1
    return np.where(two & odd, idx + 1, idx)


def e4m3_round(v: np.ndarray) -> np.ndarray:
    """fp32 magnitudes <= 448 -> nearest E4M3 value (ties to even mantissa)."""
    out = E4M3[nearest_even(v, E4M3)].astype(np.float32)
    return np.where(np.isnan(v), np.nan, out).astype(np.float32)


def e2m1_codes(v: np.ndarray) -> np.ndarray:
    """Signed fp32 values in [-6, 6] -> E2M1 codes; tiny negatives keep the sign (code 8)."""
    mag = nearest_even(np.abs(v), E2M1)
    mag = np.where(np.isnan(v), 0, mag)
    return (mag + 8 * (v < 0)).astype(np.uint8)


def hadamard16(dtype=torch.float32) -> torch.Tensor:
    h = np.array([[1.0]])
    while h.shape[0] < 16:
        h = np.block([[h, h], [h, -h]])
    return torch.tensor(SIGNS[:, None] * h / 4.0, dtype=dtype)


def rht16(x: torch.Tensor) -> torch.Tensor:
    """The transform as docs/numerics.md defines it, in numpy: fp32 sums of +-x (exact products)
    in four partial sums over every fourth input, added left to right, times 1/4, rounded once
    to x's dtype."""
    a = x.reshape(-1, 16).float().numpy()
    s = np.sign(hadamard16().numpy()).astype(np.float32)  # [input k, output j]
    acc = [a[:, k : k + 1] * s[k] for k in range(4)]
    for k in range(4, 16):
        acc[k % 4] = acc[k % 4] + a[:, k : k + 1] * s[k]
    out = (((acc[0] + acc[1]) + acc[2]) + acc[3]) * F32(0.25)
    return torch.from_numpy(out.astype(np.float32)).to(x.dtype).reshape(x.shape)


def nvfp4(x: torch.Tensor, tile=(1, 16), rht=False, amax=None):
    """Returns (codes uint8 [M, K], scales as float32 E4M3 values [M, K/16], amax float32)."""
    x2 = x.reshape(-1, x.shape[-1])
    if rht:  # TE applies the transform before quantizing, rounded to the input's dtype
        x2 = rht16(x2)
    a = x2.float().numpy()
    m, k = a.shape
    amax = F32(np.abs(a).max()) if amax is None else F32(amax)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        s_enc = F32(2688) / amax
        s_enc = min(s_enc, FLT_MAX)
        s_enc = F32(1.0) if s_enc == 0 else s_enc
        s_dec = F32(1) / s_enc
        mult = s_enc * (F32(1) / F32(6))
        blocks = a.reshape(m, k // 16, 16)
        if tile == (16, 16):
            t = np.abs(a).reshape(m // 16, 16, k // 16, 16).max(axis=(1, 3))
            vmax = np.repeat(t, 16, axis=0)
        else:
            vmax = np.abs(blocks).max(-1)
        scale = e4m3_round(np.minimum(vmax.astype(np.float32) * mult, F32(448)))
        enc = np.minimum(F32(1) / (scale * s_dec), FLT_MAX).astype(np.float32)
        v = np.clip(blocks * enc[..., None], F32(-6), F32(6)).astype(np.float32)
    return e2m1_codes(v).reshape(m, k), scale, amax


def nvfp4_dequant(codes, scale, amax) -> np.ndarray:
    vals = np.concatenate([E2M1, -E2M1]).astype(np.float32)[codes]
    return vals * np.repeat(scale, 16, axis=1) * (F32(amax) / F32(2688))


def ceil_log2(d: float) -> int:
    """Exact ceil(log2(d)) via frexp in float64 (d is an fp32 value), clamped to [-127, 127]."""
    if d == 0:
        return -127
    mant, e = np.frexp(np.float64(d))  # d = mant * 2^e, mant in [0.5, 1)
    c = e - 1 if mant == 0.5 else e
    return int(min(max(c, -127), 127))


def mxfp4(x: torch.Tensor):
    """Returns (codes [M, K], scale exponents [M, K/32])."""
    a = x.reshape(-1, x.shape[-1]).float().numpy()
    m, k = a.shape
    blocks = a.reshape(m, k // 32, 32)
    d = (np.abs(blocks).max(-1) / F32(6)).astype(np.float32)
    exps = np.vectorize(ceil_log2)(d).astype(np.int64)
    scale = np.ldexp(np.float32(1), exps).astype(np.float32)
    v = np.clip(blocks * (F32(1) / scale)[..., None], -6, 6).astype(np.float32)
    return e2m1_codes(v).reshape(m, k), exps


def fp8_current(x: torch.Tensor, block: tuple[int, int] | None, pow2: bool):
    """Returns dequantized values [M, K] (float32) of TE-style E4M3 current scaling."""
    a = x.reshape(-1, x.shape[-1]).float().numpy()
    m, k = a.shape
    bm, bk = block if block else (m, k)
    out = np.empty_like(a)
    for i in range(0, m, bm):
        for j in range(0, k, bk):
            blk = a[i : i + bm, j : j + bk]
            amax = F32(np.abs(blk).max())
            with np.errstate(divide="ignore"):
                scale = F32(448) / amax if amax > 0 else F32(1)
            scale = min(scale, FLT_MAX)
            if pow2 and amax > 0:
                scale = F32(2.0 ** np.floor(np.log2(np.float64(scale))))
            q = np.clip(blk * scale, -448, 448).astype(np.float32)
            qv = np.sign(q) * e4m3_round(np.abs(q))
            out[i : i + bm, j : j + bk] = qv * (F32(1) / scale)
    return out
