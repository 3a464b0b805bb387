"""Containers: block-scaled comparison formats (MXFP4, MXFP8, FP8), and a GEMM operand kept as values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import check_dequant_dtype
from .e2m1 import unpack_nibbles, values_from_codes


@dataclass
class BlockQuantized:
    """Quantized data plus one scale per block.

    element:    ``"e2m1"`` (data: packed uint8, two codes a byte) or ``"e4m3"``
                (data: float8_e4m3fn)
    scale:      ``scale_kind="ue8m0"``: uint8 biased exponents (2^(s-127); 255 = NaN);
                ``scale_kind="fp32"``: fp32 dequantization factors (TE's scale_inv)
    scale rows: one per row for 1xB blocks, one per B-row tile for BxB blocks
    """

    element: str
    data: torch.Tensor
    scale: torch.Tensor
    shape: torch.Size
    tile: tuple[int, int] | None
    scale_kind: str = "fp32"

    def element_values(self) -> torch.Tensor:
        if self.element == "e2m1":
            return values_from_codes(unpack_nibbles(self.data))
        return self.data.float()

    def scale_values(self) -> torch.Tensor:
        if self.scale_kind == "ue8m0":
            s = self.scale.to(torch.int32)
            return torch.where(s == 255, float("nan"), torch.ldexp(torch.ones_like(s, dtype=torch.float32), s - 127))
        return self.scale.float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        check_dequant_dtype(dtype, "BlockQuantized.dequantize")
        v = self.element_values()
        s = self.scale_values()
        if s.numel() == 1:
            out = v * s.reshape(())
        else:
            tm, tk = self.tile or (1, v.shape[-1])
            s = s.repeat_interleave(tk, dim=1)
            if tm > 1:
                s = s.repeat_interleave(tm, dim=0)
            out = v * s[: v.shape[0], : v.shape[1]]
        return out[:, : self.shape[-1]].to(dtype).reshape(self.shape)


@dataclass
class GemmOperand:
    """A GEMM operand kept as values in the compute dtype and a per-tensor factor (None: 1), for
    formats whose codes are not kept between forward and backward. Same interface as NVFP4Tensor."""

    values: torch.Tensor | None
    factor: torch.Tensor | None

    def operand(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.values, self.factor

    def prepare_for_saving(self) -> tuple[list, GemmOperand]:
        return [self.values, self.factor], GemmOperand(None, None)

    def restore_from_saved(self, tensors: list) -> list:
        self.values, self.factor = tensors[:2]
        return tensors[2:]
