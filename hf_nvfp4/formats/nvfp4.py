"""NVFP4: E2M1 elements, 16-element blocks with E4M3 scales, one fp32 scale per tensor.

Bit-exact with Transformer Engine's reference quantizer (``reference_nvfp4.py``); the
steps are numbered as in docs/numerics.md:

1. ``amax = max|x|`` (after the RHT when ``rht=True``)
2. ``s_enc = min(2688 / amax, FLT_MAX)``, 1.0 if that is 0; ``s_dec = 1 / s_enc``
3. per block ``vmax = max|x_block|`` (1x16 along the row, or a whole 16x16 tile)
4. ``scale = e4m3(min(vmax * (s_enc * fp32(1/6)), 448))``  (TE's folded multiplier)
5. ``enc = min(1 / (fp32(scale) * s_dec), FLT_MAX)``
6. ``q = E2M1(clamp(x * enc, -6, 6))``, nearest (ties to even code) or stochastic
7. ``x_hat = (q * fp32(scale)) * (amax / 2688)``

All seven steps run as one compiled call (:func:`_quantize_blocks`; the Hadamard transform and packing
codes into bytes are separate passes): for the small tensors of a small model the cost is per
call, not per element. The scalars of step 2 are computed inside it; compiled with
division_rounding (see _compile) they equal the eager ones bit for bit (tested over 60 decades).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _random
from ._common import (
    E4M3_MAX,
    FLT_MAX,
    as_2d,
    check_amax,
    check_dequant_dtype,
    check_generator,
    check_input,
    check_rht_size,
    check_tile,
    pad_2d,
    shape_2d,
)
from ._compile import fused
from .e2m1 import (
    codes_from_values,
    round_e2m1,
    round_e2m1_stochastic,
    signed,
    unpack_nibbles,
    values_from_codes,
)
from .hadamard import hadamard_transform

NVFP4_TILES = ((1, 16), (16, 16))
# Passes over tensors below this many elements run on one CPU thread (see _compile.fused): below it
# an OpenMP region costs more than it saves; above it two threads were faster on a quiet 2-core CPU
# at every Linear size measured (a 1024x1024 operand 1.9 -> 1.2 ms; issue 24).
SERIAL_BELOW = 1 << 16
TENSOR_SCALE = 448.0 * 6.0  # 2688
# fp32(1/6) as a Python float (exact in fp32): a constant, not a tensor built on the device per call,
# which would be a host-to-device copy per quantization
_RCP6 = float(torch.reciprocal(torch.tensor(6.0, dtype=torch.float32)))


@dataclass
class NVFP4Tensor:
    """A quantized NVFP4 tensor in TE's layout.

    data:  uint8 [M, K/2], two E2M1 codes per byte, even index in the low nibble
    scale: float8_e4m3fn [M, K/16]; a 16x16 tile's scale is repeated on its 16 rows
    amax:  fp32 scalar, the per-tensor amax the scales were built from
    shape: the input's shape (M is the product of its leading dims)

    When K is not a multiple of 16, data and scale cover K rounded up to 16 (zero
    padded) and :meth:`dequantize` crops back to ``shape``, except with ``rht=True``:
    the transformed basis mixes the padding into every column, so the result keeps the
    padded width (cropping it would lose information).
    """

    data: torch.Tensor
    scale: torch.Tensor
    amax: torch.Tensor
    shape: torch.Size
    tile: tuple[int, int] = (1, 16)
    rht: bool = False

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``e2m1 * fp32(scale) * amax / 2688`` in fp32, then cast to ``dtype``.

        With ``rht=True`` the result is in the transformed basis (as TE's is) and has the
        padded width: ``shape[:-1] + (data.shape[1] * 2,)``.
        """
        check_dequant_dtype(dtype, "NVFP4Tensor.dequantize")
        q = values_from_codes(unpack_nibbles(self.data))
        s = self.scale.float().repeat_interleave(16, dim=1)
        out = (q * s) * (self.amax.float() / TENSOR_SCALE)
        if self.rht:
            return out.to(dtype).reshape(*self.shape[:-1], out.shape[1])
        k = self.shape[-1]
        return out[:, :k].to(dtype).reshape(self.shape)

    def size(self) -> torch.Size:
        return self.shape

    # -- the quantized-tensor interface the training ops use (TE's reference tensors have it too)
    def operand(self, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, g)`` for a GEMM: ``e2m1 * fp32(scale)`` in ``dtype`` (padded width), ``amax / 2688``."""
        return nvfp4_operand_from_packed(self, dtype)

    def prepare_for_saving(self) -> tuple[list[torch.Tensor], NVFP4Tensor]:
        """The tensors for ``ctx.save_for_backward``, and a copy of this object without them."""
        return [self.data, self.scale, self.amax], dataclasses.replace(self, data=None, scale=None, amax=None)

    def restore_from_saved(self, tensors: list) -> list:
        """Take back this object's tensors from the front of ``tensors``; returns the rest."""
        self.data, self.scale, self.amax = tensors[:3]
        return tensors[3:]

    def __repr__(self) -> str:
        return f"NVFP4Tensor(shape={tuple(self.shape)}, tile={self.tile}, rht={self.rht}, amax={float(self.amax):.6g})"


# ----------------------------------------------------------------------------- kernels


def _tensor_scalars(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 2 and 7's factor: (s_enc * fp32(1/6), s_dec, amax / 2688), all fp32 scalars."""
    amax = amax.to(torch.float32)
    s_enc = torch.clamp(torch.div(TENSOR_SCALE, amax), max=FLT_MAX)
    s_enc = torch.where(s_enc == 0, torch.ones_like(s_enc), s_enc)
    s_dec = torch.reciprocal(s_enc)
    mult = s_enc * _RCP6
    return mult, s_dec, amax / TENSOR_SCALE


def _block_amax(xb: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-block max |x| as fp32 (NaN propagates): [B, 16] -> [B], or [M/16, 16, K/16, 16] -> [M/16, K/16].

    A float abs-max reduction: on AVX2 it vectorizes, where a max over the integer bits with the
    sign cleared compiled to a loop 2-18x slower (measured with benchmarks/quantize.py). (Comparing a
    1x16 block's two halves first was 25% faster alone on AVX-512, no faster inside the fused
    quantization, and made it 1.5x slower with AVX2 code: not done.)
    """
    return xb.float().abs().amax(dim=dims)


def _round_e4m3(s: torch.Tensor) -> torch.Tensor:
    """fp32 values in [0, 448] (or NaN) rounded to the nearest E4M3 value, ties to even, as fp32.

    Equal to ``s.to(float8_e4m3fn).float()`` (checked on every midpoint and 30M samples), but
    with compares and adds only: the step is 2^-9 below 2^-6 (subnormals), else 2^(e-3) for
    the binade 2^e, and adding and subtracting 1.5 * 2^23 * step rounds to it. Inductor's CPU
    code converts to and from E4M3 one lane at a time, which made this kernel 25x slower.
    """
    if not torch.compiler.is_compiling():
        return _round_e4m3_eager(s)
    step = torch.full_like(s, 2.0**-9)
    for e in range(-6, 9):
        step = torch.where(s >= 2.0**e, 2.0 ** (e - 3), step)
    magic = step * (1.5 * 2**23)
    return (s + magic) - magic


def _round_e4m3_eager(s: torch.Tensor) -> torch.Tensor:
    """:func:`_round_e4m3` in a few whole-tensor ops for the eager path (small tensors): the step
    2^(e-3) of s's binade 2^e (at least 2^-9) built from frexp's exponent as fp32 bits, then
    ``round(s / step) * step`` (exact scalings by powers of two; round is ties-to-even)."""
    _, e = torch.frexp(s)  # s = m * 2^e with m in [0.5, 1): the binade is 2^(e-1)
    step = ((e - 4).clamp_(min=-9) + 127).bitwise_left_shift_(23).view(torch.float32)
    return torch.round(s / step).mul_(step)


def _round_e2m1_eager(a: torch.Tensor) -> torch.Tensor:
    """:func:`~hf_nvfp4.formats.e2m1.round_e2m1` in a few whole-tensor ops for the eager path: the
    grid step is 0.5 below 2, 1 below 4, else 2, and ``round`` (ties to even) on a/step picks
    the even code at every midpoint; NaN stays NaN."""
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    return torch.round(a / step).mul_(step)


def _scales(vmax: torch.Tensor, mult: torch.Tensor, s_dec: torch.Tensor):
    """Steps 4-5: (the E4M3 scale as fp32, fp32 encode factor) per block.

    The fp32 scale spares the element kernels an E4M3 decode per block; only
    :func:`quantize_nvfp4` stores it as E4M3 (an exact conversion).
    """
    scale_f32 = _round_e4m3(torch.clamp(vmax * mult, max=E4M3_MAX))
    enc = torch.clamp(torch.reciprocal(scale_f32 * s_dec), max=FLT_MAX)
    return scale_f32, enc


def _round(xb, enc, seeds):
    v = xb.float() * enc
    a = torch.clamp(v.abs(), max=6.0)
    if seeds is None:
        return (round_e2m1(a) if torch.compiler.is_compiling() else _round_e2m1_eager(a)), v
    return round_e2m1_stochastic(a, _random.hashed_uniform(seeds, a.shape, a.device)), v


@fused(dims=(0, 2), serial=SERIAL_BELOW)
def _quantize_blocks(xb: torch.Tensor, amax: torch.Tensor | None, seeds: torch.Tensor | None, out: str,
                     dtype: torch.dtype):
    """Steps 1-7 in one call (one compiled graph: for small tensors the cost is per call, not per
    element). ``xb``: 1x16 blocks as [B, 16], or 16x16 tiles as [M/16, 16, K/16, 16] (block dims
    static, the others dynamic: a view with an inferred size inside the graph would make the inner
    loop symbolic). ``out``: ``"codes"`` (uint8 codes [B, 16]), ``"values"`` (``e2m1 *
    fp32(scale)`` in ``dtype``) or ``"fake"`` (values times ``amax / 2688``). Returns
    ``(out, scale_f32, amax, g)``, scale_f32 with one row per 16-element row block (a 16x16 tile's
    on each of its rows). The step-2 scalars are computed here: compiled with division_rounding (see
    _compile) they equal the eager ones bit for bit (tested).
    """
    if xb.ndim == 2:
        vmax = _block_amax(xb, (1,)).view(-1, 1)
    else:
        vmax = _block_amax(xb, (1, 3)).view(xb.shape[0], 1, xb.shape[2], 1)
    if amax is None:  # the tensor amax is the max of the block maxima: no extra pass over x
        amax = vmax.amax()
    mult, s_dec, g = _tensor_scalars(amax)
    scale_f32, enc = _scales(vmax, mult, s_dec)
    if xb.ndim == 4:  # tile values onto their 16 rows: the element pass sees [B, 16] blocks
        scale_f32, enc = (t.expand(-1, 16, -1, -1).reshape(-1, 1) for t in (scale_f32, enc))
        xb = xb.reshape(-1, 16)
    q, v = _round(xb, enc, seeds)
    if out == "codes":
        return codes_from_values(q, v), scale_f32, amax, g
    vals = signed(q, v) * scale_f32
    return (vals * g if out == "fake" else vals).to(dtype), scale_f32, amax, g


# Codes are packed in a second pass: pairing neighbours inside the rounding kernel compiled to
# element-by-element gathers (3.4x slower at 1024x2816); bytes viewed as int16 pair them for free.
@fused(dims=(0,), serial=SERIAL_BELOW, scale=2)
def _pack_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """int16 views of code pairs (little endian: even index in the low byte) -> packed bytes."""
    v = pairs.to(torch.int32)
    return ((v | (v >> 4)) & 0xFF).to(torch.uint8)


def _packed(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [B, 16] -> bytes [B, 8], even index in the low nibble (TE's layout)."""
    return _pack_pairs(codes.reshape(-1).view(torch.int16)).view(codes.shape[0], codes.shape[1] // 2)


class _Prepared(NamedTuple):
    """A checked input, ready for :func:`_quantize_blocks`."""

    x: torch.Tensor  # the checked input
    x2: torch.Tensor  # 2D, zero-padded to whole blocks (and Hadamard-transformed with rht)
    tile: tuple[int, int]
    amax: torch.Tensor | None  # an overriding per-tensor amax (fp32, on x's device), else None
    seeds: torch.Tensor | None  # stochastic rounding seeds, None for nearest


def _prepare(x, tile, rht, rht_size, stochastic, generator, amax, fn) -> _Prepared:
    x = check_input(x, fn)
    tile = check_tile(tile, NVFP4_TILES, fn)
    amax = check_amax(amax, fn)
    generator = check_generator(generator, fn)
    rht_size = check_rht_size(rht_size, fn)
    if rht and tile != (1, 16):
        raise ValueError(f"{fn}: rht=True is for 1x16 operands (Wgrad); got tile={tile}")
    if rht:  # the transform reads a transposed (Wgrad) operand in place and writes it contiguous
        x2 = x.detach()
        x2 = pad_2d(x2 if x2.ndim == 2 else x2.reshape(shape_2d(x2)), (tile[0], max(tile[1], rht_size)), fn)
        if x2.numel():
            x2 = hadamard_transform(x2, rht_size)
    else:
        x2 = pad_2d(as_2d(x.detach()), tile, fn)
    if amax is not None:
        amax = amax.to(device=x.device, dtype=torch.float32)
    seeds = _random.draw_seeds(generator, x.device) if stochastic else None
    return _Prepared(x, x2, tile, amax, seeds)


def _run(p: _Prepared, out: str, dtype: torch.dtype):
    """``(out, scale_f32, amax, g)`` of :func:`_quantize_blocks`, also for an empty tensor."""
    if p.x2.numel() == 0:
        amax = torch.zeros((), device=p.x.device) if p.amax is None else p.amax
        m, k = p.x2.shape
        res = torch.empty(m * k // 16, 16, dtype=torch.uint8 if out == "codes" else dtype, device=p.x.device)
        return res, torch.empty(m * k // 16, 1, device=p.x.device), amax, _tensor_scalars(amax)[2]
    m, k = p.x2.shape
    xb = p.x2.view(-1, 16) if p.tile == (1, 16) else p.x2.view(m // 16, 16, k // 16, 16)
    return _quantize_blocks(xb, p.amax, p.seeds, out, dtype)


def quantize_nvfp4(
    x: torch.Tensor,
    *,
    tile: tuple[int, int] = (1, 16),
    rht: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | float | None = None,
    rht_size: int = 16,
) -> NVFP4Tensor:
    """Quantize ``x`` (fp32/bf16/fp16, blocks along the last dim) to NVFP4, bit-exact with TE.

    tile:       ``(1, 16)`` or ``(16, 16)`` (2D weight scaling)
    rht:        apply the signed 16-point Hadamard transform first (amax taken after it);
                the last dim is zero-padded to a multiple of ``rht_size`` and :meth:`dequantize`
                keeps that padded width (the transformed basis)
    stochastic: unbiased stochastic rounding, reproducible from ``generator`` (a torch.Generator)
    amax:       override the per-tensor amax (e.g. one reduced across processes)

    >>> import torch, hf_nvfp4
    >>> q = hf_nvfp4.quantize_nvfp4(torch.randn(32, 64))
    >>> q.data.shape, q.scale.shape
    (torch.Size([32, 32]), torch.Size([32, 4]))
    """
    p = _prepare(
        x, tile, rht, rht_size, stochastic, generator, amax, "quantize_nvfp4"
    )
    m, k = p.x2.shape
    codes, scale_f32, amax_, _ = _run(p, "codes", torch.uint8)
    rows = shape_2d(p.x)[0]
    data = _packed(codes).reshape(m, k // 2)[:rows]
    # TE's layout: a 16x16 tile's scale on each of its rows; E4M3 holds these fp32 values exactly
    scales = scale_f32.view(m, k // 16)[:rows].to(torch.float8_e4m3fn)
    return NVFP4Tensor(data.contiguous(), scales.contiguous(), amax_.float(), p.x.shape, p.tile, rht)


def fake_quantize_nvfp4(
    x: torch.Tensor,
    *,
    tile: tuple[int, int] = (1, 16),
    rht: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    amax: torch.Tensor | float | None = None,
    rht_size: int = 16,
) -> torch.Tensor:
    """Quantize and dequantize in one fused pass; returns ``x``'s shape and dtype.

    Equal, bit for bit, to ``quantize_nvfp4(x, ...).dequantize(x.dtype)`` with the same
    keywords and generator state. Not differentiable (the output is detached, also when
    ``amax`` requires grad): the training ops define the gradients. With ``rht=True`` the
    result is in the transformed basis and keeps the padded width (K rounded up to a
    multiple of ``rht_size``); invert it with ``y.view(-1, 16) @ hadamard_matrix(16).T``
    and crop.

    >>> import torch, hf_nvfp4
    >>> x = torch.randn(16, 32, dtype=torch.bfloat16)
    >>> y = hf_nvfp4.fake_quantize_nvfp4(x)
    >>> y.shape, y.dtype
    (torch.Size([16, 32]), torch.bfloat16)
    """
    p = _prepare(
        x, tile, rht, rht_size, stochastic, generator, amax, "fake_quantize_nvfp4"
    )
    m, k = p.x2.shape
    rows, cols = shape_2d(p.x)
    if rht:  # the transformed basis keeps the padded width
        cols = k
    shape = (*p.x.shape[:-1], cols)
    if p.x2.numel() == 0:
        return torch.zeros(shape, dtype=p.x.dtype, device=p.x.device)
    out = _run(p, "fake", p.x.dtype)[0].reshape(m, k)
    if (rows, cols) != (m, k):
        out = out[:rows, :cols]
    return out.reshape(shape)


# ----------------------------------------------------------------------------- GEMM operands


def nvfp4_gemm_operand(
    x: torch.Tensor,
    *,
    tile: tuple[int, int] = (1, 16),
    rht: bool = False,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    rht_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    amax: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, g)`` with ``values = e2m1 * fp32(scale)`` and ``g = amax / 2688``.

    ``values`` is exact in bf16/fp16/fp32 (at most 5 significant bits, within [2^-10, 2688]),
    so a GEMM on two such operands followed by one multiply with ``g_a * g_b`` reproduces
    the NVFP4 GEMM. Rows are cropped to the input's; the last dim keeps its zero padding
    (cropping a Hadamard-transformed operand would change the product).
    """
    p = _prepare(
        x, tile, rht, rht_size, stochastic, generator, amax, "nvfp4_gemm_operand"
    )
    m, k = p.x2.shape
    vals, _, _, g = _run(p, "values", dtype)
    if p.x2.numel() == 0:
        return torch.zeros(shape_2d(p.x)[0], k, dtype=dtype, device=p.x.device), g
    return vals.reshape(m, k)[: shape_2d(p.x)[0]], g


@fused(dims=(0,), scale=2)
def _unpack_scaled(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed codes [R, nb, 8] and E4M3 scales [R, nb, 1] -> e2m1 * fp32(scale) [R, nb, 8, 2].

    Both nibbles are decoded as floats in int32 lanes and interleaved last (5x faster than
    interleaving the uint8 codes first: the byte shuffle does not vectorize); the scales are
    widened inside the kernel, not by a separate pass.
    """
    d = data.to(torch.int32)
    vals = torch.stack([values_from_codes(d & 0x0F), values_from_codes(d >> 4)], dim=-1)
    return (vals * scale.float().unsqueeze(-1)).to(dtype)


def nvfp4_operand_from_packed(q: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, g)`` of a saved :class:`NVFP4Tensor` (padded width), as :func:`nvfp4_gemm_operand`."""
    r, half = q.data.shape
    vals = _unpack_scaled(q.data.view(r, half // 8, 8), q.scale.view(r, half // 8, 1), dtype)
    return vals.view(r, half * 2), q.amax.float() / TENSOR_SCALE
