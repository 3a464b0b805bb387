"""TE stand-in for pytorch/tensor/identity_tensor.py (TE >= 2.19, PR #2817; d0067d0da): a
high-precision passthrough quantizer. ``dtype=None`` keeps the tensor's own dtype, else it casts
(identity_tensor.py:45-77)."""

from __future__ import annotations

import torch

from ..quantized_tensor import Quantizer


class IdentityQuantizer(Quantizer):
    def __init__(self, *, dtype: torch.dtype | None = None, rowwise: bool = True, columnwise: bool = True) -> None:
        super().__init__(rowwise=rowwise, columnwise=columnwise)
        self.dtype = dtype

    def quantize(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = t.detach()
        if self.dtype is not None and out.dtype != self.dtype:
            out = out.to(self.dtype)
        return out, out.t()
