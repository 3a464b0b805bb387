"""TE stand-in for pytorch/tensor/nvfp4_tensor.py (d0067d0da): NVFP4Quantizer's constructor (same
signature and checks), the checks TE's C++ quantizer makes before a cast (csrc/quantizer.cpp),
with TE's messages, and the cast itself, computed by the stand-in's own numerics (_numerics.py).

Rowwise data is the tensor as given, columnwise data its transpose, RHT-transformed when
``with_rht`` (reference_nvfp4.py:867-874; the RHT is never applied rowwise). Stochastic rounding,
when on, applies to both directions (csrc/quantizer.cpp:2557 and :2615-2621).
"""

from __future__ import annotations

import torch

from ... import _numerics as N
from ..constants import DType
from ..quantized_tensor import Quantizer

NVFP4_BLOCK_SCALING_SIZE = 16
_TE_DTYPE = {torch.float32: DType.kFloat32, torch.float16: DType.kFloat16, torch.bfloat16: DType.kBFloat16}


class NVFP4Quantizer(Quantizer):
    def __init__(
        self,
        fp4_dtype=DType.kFloat4E2M1,
        rowwise: bool = True,
        columnwise: bool = True,
        with_amax_reduction: bool = False,
        amax_reduction_group=None,
        with_rht: bool = False,
        with_post_rht_amax: bool = False,
        with_2d_quantization: bool = False,
        stochastic_rounding: bool = False,
        row_scaled_nvfp4: bool = False,
        nvfp4_use_4over6: bool = False,
        nvfp4_e4m3_max: int = 448,
        nvfp4_4over6_err_mode: str = "MAE",
        with_random_sign_mask: bool = True,
    ) -> None:
        super().__init__(rowwise=rowwise, columnwise=columnwise)
        self.dtype = DType(fp4_dtype)
        self.with_rht = with_rht
        self.with_post_rht_amax = with_post_rht_amax
        self.with_amax_reduction = with_amax_reduction
        self.amax_reduction_group = amax_reduction_group
        self.with_2d_quantization = with_2d_quantization
        self.stochastic_rounding = stochastic_rounding
        self.row_scaled_nvfp4 = row_scaled_nvfp4
        self.nvfp4_use_4over6 = nvfp4_use_4over6
        self.nvfp4_e4m3_max = nvfp4_e4m3_max if nvfp4_use_4over6 else 448
        if self.nvfp4_e4m3_max not in (448, 256):
            raise ValueError("nvfp4_e4m3_max must be 448 or 256.")
        self.nvfp4_4over6_err_mode = nvfp4_4over6_err_mode.upper()
        if self.nvfp4_4over6_err_mode not in ("MAE", "MSE"):
            raise ValueError("nvfp4_4over6_err_mode must be 'MAE' or 'MSE'.")
        self.with_random_sign_mask = with_random_sign_mask

    def check_input(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """What quantizer.cpp checks before an NVFP4 cast (NVTE_CHECK / NVTE_ERROR -> RuntimeError):
        both flattened dims divisible by 16 (csrc/quantizer.cpp:1982-1986), bf16 input for RHT
        (:2630-2633)."""
        rows, cols = 1, shape[-1]
        for s in shape[:-1]:
            rows *= s
        if rows % NVFP4_BLOCK_SCALING_SIZE:
            raise RuntimeError(f"First dim for NVFP4 must be divisible by 16 (got shape={list(shape)})")
        if cols % NVFP4_BLOCK_SCALING_SIZE:
            raise RuntimeError(f"NVFP4 requires tensor dims that are divisible by 16 (got shape={list(shape)})")
        if self.with_rht and dtype != torch.bfloat16:
            raise RuntimeError(
                f"RHT is only supported for bfloat16 input, got dtype enum value {int(_TE_DTYPE[dtype])}"
            )

    def quantize(self, t: torch.Tensor) -> tuple[N.Q | None, N.Q | None]:
        """(rowwise, columnwise) operands of the 2D tensor ``t`` as the stand-in's GEMM takes them."""
        self.check_input(tuple(t.shape), t.dtype)
        tile = (16, 16) if self.with_2d_quantization else (1, 16)
        row = N.nvfp4(t, tile, self.stochastic_rounding) if self.rowwise_usage else None
        col = None
        if self.columnwise_usage:
            tt = t.t().contiguous()
            col = N.nvfp4(N.rht16(tt) if self.with_rht else tt, tile, self.stochastic_rounding)
        return row, col
