"""One registry of quantization formats keyed by name, each with the same two calls.

>>> from hf_nvfp4.formats import get_format
>>> fmt = get_format("mxfp4")
>>> fmt.act_tile, fmt.weight_tile
((1, 32), (1, 32))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import fp8, mx, nvfp4
from .hadamard import hadamard_transform


@dataclass(frozen=True)
class Format:
    """A quantization format as the training ops see it.

    act_tile / weight_tile: block shapes for activations and gradients / for weights
    (weight_tile is the 2D tile where the format has one).
    stochastic: whether stochastic rounding is available (the FP4 formats).
    per_tensor_amax: whether an ``amax`` override means anything.
    """

    name: str
    act_tile: tuple[int, int] | None
    weight_tile: tuple[int, int] | None
    stochastic: bool
    per_tensor_amax: bool
    _quantize: Callable
    _fake: Callable

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

    def quantize(
        self,
        x: torch.Tensor,
        *,
        tile=None,
        rht: bool = False,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        amax=None,
    ):
        """Quantize ``x`` (blocks along the last dim); returns the format's quantized container."""
        return self._call(self._quantize, x, tile, rht, stochastic, generator, amax, "quantize")

    def fake_quantize(
        self,
        x: torch.Tensor,
        *,
        tile=None,
        rht: bool = False,
        stochastic: bool = False,
        generator: torch.Generator | None = None,
        amax=None,
    ) -> torch.Tensor:
        """Quantize and dequantize; returns ``x``'s shape and dtype (in the RHT basis if ``rht``).

        With ``rht=True`` the last dim is zero-padded to a multiple of 16 first, and the output keeps that width.
        """
        return self._call(self._fake, x, tile, rht, stochastic, generator, amax, "fake_quantize")

    def _call(self, fn, x, tile, rht, stochastic, generator, amax, what):
        kw = self._kwargs(tile, stochastic, generator, amax, what)
        if rht and self.name == "nvfp4":  # NVFP4 takes the amax after its own transform
            return fn(x, rht=True, **kw)
        return fn(_rht(x) if rht else x, **kw)


def _rht(x: torch.Tensor) -> torch.Tensor:
    pad = (-x.shape[-1]) % 16
    return hadamard_transform(F.pad(x, (0, pad)) if pad else x)


FORMATS: dict[str, Format] = {
    "nvfp4": Format("nvfp4", (1, 16), (16, 16), True, True, nvfp4.quantize_nvfp4, nvfp4.fake_quantize_nvfp4),
    "mxfp4": Format("mxfp4", (1, 32), (1, 32), True, False, mx.quantize_mxfp4, mx.fake_quantize_mxfp4),
    "mxfp8": Format("mxfp8", (1, 32), (1, 32), False, False, mx.quantize_mxfp8, mx.fake_quantize_mxfp8),
    "fp8_block": Format(
        "fp8_block", (1, 128), (128, 128), False, False, fp8.quantize_fp8_block, fp8.fake_quantize_fp8_block
    ),
    "fp8_tensor": Format("fp8_tensor", None, None, False, True, fp8.quantize_fp8_tensor, fp8.fake_quantize_fp8_tensor),
}


def get_format(name: str) -> Format:
    """Look a format up by name: one of ``nvfp4``, ``mxfp4``, ``mxfp8``, ``fp8_block``, ``fp8_tensor``."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}") from None
