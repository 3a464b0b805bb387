"""One registry of number formats keyed by name: what each can do, and the same calls for all.

Nothing outside this file and the role table (``hf_nvfp4.ops.recipe``) names a format: the
training ops ask a :class:`Format` for its capabilities (tiles, RHT sizes, stochastic rounding)
and call its methods. ``"bf16"`` is the high-precision entry: no quantization at all.

>>> from hf_nvfp4.formats import get_format
>>> fmt = get_format("mxfp4")
>>> fmt.act_tile, fmt.weight_tile, fmt.rht_sizes
((1, 32), (32, 32), (16, 32, 64, 128))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fp8, mx, nvfp4
from .hadamard import hadamard_transform

RHT_SIZES = (16, 32, 64, 128)  # the sizes the paper studied (App. E.4.1); TE implements 16


@dataclass(frozen=True)
class Format:
    """A number format as the training ops see it.

    act_tile: block shape of activations and gradients (blocks along the GEMM's inner dim);
        None for per-tensor formats.
    weight_tile: the 2D weight tile, or None where the format has no 2D weight scaling.
    stochastic: stochastic rounding available.
    rht_sizes: Hadamard sizes this format's Wgrad operands can take (empty: no RHT).
    per_tensor_amax: an ``amax`` override means something.
    packed: quantized operands can be kept packed (4.5 bits an element) between forward and
        backward, through :meth:`pack` / :meth:`operand_from_packed`.
    quantizes: False only for ``"bf16"`` (high precision).
    """

    name: str
    act_tile: tuple[int, int] | None
    weight_tile: tuple[int, int] | None
    stochastic: bool
    rht_sizes: tuple[int, ...]
    per_tensor_amax: bool
    _quantize: Callable | None
    _fake: Callable | None
    packed: bool = False
    quantizes: bool = True

    def _kwargs(self, tile, stochastic, generator, amax, fn):
        kw: dict = {}
        if self.act_tile is not None:
            kw["tile"] = self.act_tile if tile is None else tile
        elif tile is not None:
            raise ValueError(f"{self.name}.{fn}: this format has no blocks; leave tile=None")
        if stochastic or generator is not None:
            if not self.stochastic:
                raise ValueError(f"{self.name}.{fn}: stochastic rounding is only available for the FP4 formats")
            kw["stochastic"], kw["generator"] = stochastic, generator
        if amax is not None:
            if not self.per_tensor_amax:
                raise ValueError(f"{self.name}.{fn}: this format has no per-tensor scale, so amax does not apply")
            kw["amax"] = amax
        return kw

    def quantize(self, x: torch.Tensor, *, tile=None, rht: bool = False, stochastic: bool = False,
                 generator: torch.Generator | None = None, amax=None, rht_size: int = 16):
        """Quantize ``x`` (blocks along the last dim); returns the format's quantized container."""
        return self._call(self._quantize, x, tile, rht, rht_size, stochastic, generator, amax, "quantize")

    def fake_quantize(self, x: torch.Tensor, *, tile=None, rht: bool = False, stochastic: bool = False,
                      generator: torch.Generator | None = None, amax=None, rht_size: int = 16) -> torch.Tensor:
        """Quantize and dequantize; returns ``x``'s dtype (in the RHT basis if ``rht``).

        With ``rht=True`` the last dim is zero-padded to a multiple of ``rht_size`` first, and the
        output keeps that width (cropping a transformed operand would lose information).
        """
        return self._call(self._fake, x, tile, rht, rht_size, stochastic, generator, amax, "fake_quantize")

    def check_rht(self, rht_size: int, what: str) -> None:
        if rht_size not in self.rht_sizes:
            can = f"sizes {list(self.rht_sizes)}" if self.rht_sizes else "no random Hadamard transform"
            raise ValueError(f"{what}: format {self.name!r} supports {can}, not rht_size={rht_size}")

    def _call(self, fn, x, tile, rht, rht_size, stochastic, generator, amax, what):
        if not self.quantizes:
            raise ValueError(f"{self.name!r} is high precision: there is nothing to quantize")
        kw = self._kwargs(tile, stochastic, generator, amax, what)
        if rht:
            self.check_rht(rht_size, f"{self.name}.{what}")
            if self.per_tensor_amax and self.packed:  # NVFP4 takes its amax after its own transform
                return fn(x, rht=True, rht_size=rht_size, **kw)
            return fn(_rht(x, rht_size, self.act_tile[1] if self.act_tile else 1), **kw)
        return fn(x, **kw)

    # -- what the training ops call ---------------------------------------------------------
    def gemm_operand(self, x2: torch.Tensor, spec, dtype: torch.dtype, generator=None, amax=None):
        """``(values in dtype, per-tensor factor or None)`` of a 2D GEMM operand per a quantizer spec.

        The product of two operands' values, times their factors, is the quantized GEMM.
        ``amax``: the per-tensor amax to scale with (a fused group's joint amax), where the format has one.
        """
        if not self.quantizes:
            return x2.to(dtype), None
        gen = generator if spec.stochastic else None
        if self.packed:
            return nvfp4.nvfp4_gemm_operand(x2, tile=spec.tile, rht=spec.rht, stochastic=spec.stochastic,
                                            generator=gen, rht_size=spec.rht_size, dtype=dtype, amax=amax)
        kw = {"amax": amax} if amax is not None else {}
        vals = self.fake_quantize(x2, tile=spec.tile, rht=spec.rht, rht_size=spec.rht_size,
                                  stochastic=spec.stochastic, generator=gen, **kw)
        return vals.to(dtype), None

    def pack(self, x2: torch.Tensor, spec, dtype: torch.dtype, generator=None, amax=None):
        """What to keep for a later GEMM: packed codes where the format has them, else values."""
        if self.packed and not spec.stochastic:
            return nvfp4.quantize_nvfp4(x2, tile=spec.tile, rht=spec.rht, rht_size=spec.rht_size, amax=amax)
        return self.gemm_operand(x2, spec, dtype, generator, amax)

    @staticmethod
    def operand_from_packed(kept, dtype: torch.dtype):
        """``(values, factor)`` of what :meth:`pack` returned."""
        if isinstance(kept, nvfp4.NVFP4Tensor):
            return nvfp4.nvfp4_operand_from_packed(kept, dtype)
        return kept


def _rht(x: torch.Tensor, size: int, block: int) -> torch.Tensor:
    width = max(size, block)
    pad = (-x.shape[-1]) % width
    return hadamard_transform(F.pad(x, (0, pad)) if pad else x, size)


FORMATS: dict[str, Format] = {
    "nvfp4": Format("nvfp4", (1, 16), (16, 16), True, RHT_SIZES, True,
                    nvfp4.quantize_nvfp4, nvfp4.fake_quantize_nvfp4, packed=True),
    "mxfp4": Format("mxfp4", (1, 32), (32, 32), True, RHT_SIZES, False, mx.quantize_mxfp4, mx.fake_quantize_mxfp4),
    "mxfp8": Format("mxfp8", (1, 32), None, False, (), False, mx.quantize_mxfp8, mx.fake_quantize_mxfp8),
    "fp8_block": Format("fp8_block", (1, 128), (128, 128), False, (), False,
                        fp8.quantize_fp8_block, fp8.fake_quantize_fp8_block),
    "fp8_tensor": Format("fp8_tensor", None, None, False, (), True,
                         fp8.quantize_fp8_tensor, fp8.fake_quantize_fp8_tensor),
}
HIGH_PRECISION = Format("bf16", None, None, False, (), False, None, None, quantizes=False)
# Every name a layer's precision can take: the quantized formats, then high precision.
PRECISIONS: tuple[str, ...] = (*FORMATS, HIGH_PRECISION.name)


def get_format(name: str) -> Format:
    """Look a format up by name: ``nvfp4``, ``mxfp4``, ``mxfp8``, ``fp8_block``, ``fp8_tensor`` (or ``bf16``)."""
    if name == HIGH_PRECISION.name:
        return HIGH_PRECISION
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; choose one of {list(PRECISIONS)}") from None
