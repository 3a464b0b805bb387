"""TE stand-in for transformer_engine/pytorch/tensor/identity_tensor.py (TE >= 2.19, PR #2817):
a high-precision passthrough quantizer."""

from __future__ import annotations

import torch

from ..quantized_tensor import Quantizer


class IdentityQuantizer(Quantizer):
    def __init__(self, *, dtype: torch.dtype | None = None, rowwise: bool = True, columnwise: bool = True) -> None:
        super().__init__(rowwise=rowwise, columnwise=columnwise)
        self.dtype = dtype
