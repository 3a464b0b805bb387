"""One registry of number formats keyed by name: what each can do, and the same calls for all.

Nothing outside this file and the role table (``hf_nvfp4.config``) names a format: the
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
from .quantized import GemmOperand

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
    keeps_codes: :meth:`pack` keeps the quantized tensor itself (codes and scales, 4.5 bits an
        element for NVFP4) between forward and backward, rather than its values.
    own_rht: the quantizer applies the RHT itself (so its per-tensor amax is taken after it).
    _operand: the format's fused quantize-to-GEMM-operand path, if it has one.
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
    keeps_codes: bool = False
    own_rht: bool = False
    _operand: Callable | None = None
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
            if self.own_rht:
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
        if self._operand is not None:
            return self._operand(x2, tile=spec.tile, rht=spec.rht, stochastic=spec.stochastic,
                                 generator=gen, rht_size=spec.rht_size, dtype=dtype, amax=amax)
        kw = {"amax": amax} if amax is not None else {}
        vals = self.fake_quantize(x2, tile=spec.tile, rht=spec.rht, rht_size=spec.rht_size,
                                  stochastic=spec.stochastic, generator=gen, **kw)
        return vals.to(dtype), None

    def pack(self, x2: torch.Tensor, spec, dtype: torch.dtype, generator=None, amax=None):
        """What to keep for a later GEMM: the quantized tensor where the format keeps codes, else its
        values. Either has ``operand(dtype)``, ``prepare_for_saving()`` and ``restore_from_saved()``.
        ``amax``: as in :meth:`gemm_operand`."""
        if self.keeps_codes and not spec.stochastic:
            return self.quantize(x2, tile=spec.tile, rht=spec.rht, rht_size=spec.rht_size, amax=amax)
        return GemmOperand(*self.gemm_operand(x2, spec, dtype, generator, amax))


def _rht(x: torch.Tensor, size: int, block: int) -> torch.Tensor:
    width = max(size, block)
    pad = (-x.shape[-1]) % width
    return hadamard_transform(F.pad(x, (0, pad)) if pad else x, size)


FORMATS: dict[str, Format] = {
    "nvfp4": Format("nvfp4", (1, 16), (16, 16), True, RHT_SIZES, True,
                    nvfp4.quantize_nvfp4, nvfp4.fake_quantize_nvfp4, keeps_codes=True, own_rht=True,
                    _operand=nvfp4.nvfp4_gemm_operand),
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


# ----------------------------------------------------------------------------- Transformer Engine
# What Transformer Engine can run for each format: the one table the TE adapter (nn/te_backend.py,
# nn/te_recipes.py) reads. Read from NVIDIA/TransformerEngine at d0067d0da (2.20.0.dev0):
# - check: pytorch/quantization.py:189-223 (check_*_support)
# - align: get_align_size_for_quantization, pytorch/quantization.py:262-279 (the token multiple
#   TE pads its own grouped quantized operations to: NVFP4 128, MXFP8 32, else 16)
# - dims: both weight dims; MXFP8 32 (csrc/quantizer.cpp:1513-1515), else 16
#   (assert_dim_for_fp8_exec, pytorch/utils.py:614-624; NVFP4: csrc/quantizer.cpp:1982-1986)
# - rht_dtype: csrc/quantizer.cpp:2630-2633 ("RHT is only supported for bfloat16 input")
# - fp16_out: FP4 GEMMs cannot write fp16 (common/gemm/cublaslt_gemm.cu:430-431)


@dataclass(frozen=True)
class TESupport:
    """How Transformer Engine runs one format (see the citations above)."""

    check: str
    recipe: str
    align: int
    dims: int
    rht_dtype: torch.dtype | None
    fp16_out: bool


TE_SUPPORT: dict[str, TESupport] = {
    "nvfp4": TESupport("check_nvfp4_support", "NVFP4BlockScaling", 128, 16, torch.bfloat16, False),
    "fp8_tensor": TESupport("check_fp8_support", "Float8CurrentScaling", 16, 16, None, True),
    "fp8_block": TESupport("check_fp8_block_scaling_support", "Float8BlockScaling", 16, 16, None, True),
    "mxfp8": TESupport("check_mxfp8_support", "MXFP8BlockScaling", 32, 32, None, True),
}


def te_support(name: str) -> TESupport | None:
    """What TE can do for format ``name``, or None where TE has no recipe for it (mxfp4, bf16)."""
    return TE_SUPPORT.get(name)
