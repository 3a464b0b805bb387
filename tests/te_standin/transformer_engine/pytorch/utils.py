"""TE stand-in for transformer_engine/pytorch/utils.py: the two helpers the stand-in Linear uses."""

from __future__ import annotations

import math

import torch


def get_device_compute_capability() -> tuple[int, int]:
    """(major, minor) of the current device (tests monkeypatch torch.cuda.get_device_capability)."""
    return tuple(torch.cuda.get_device_capability())


def assert_dim_for_fp8_exec(*tensors: torch.Tensor) -> None:
    """TE's check before any quantized GEMM of te.Linear (called from module/linear.py), same message."""
    for tensor in tensors:
        if math.prod(tensor.shape[:-1]) % 8 != 0 or tensor.shape[-1] % 16 != 0:
            raise ValueError(
                "FP8 execution requires the product of all dimensions except the last to be"
                " divisible by 8 and the last dimension to be divisible by 16, but got tensor"
                f" with dims={list(tensor.size())} (product of leading dims ="
                f" {math.prod(tensor.shape[:-1])}, last dim = {tensor.shape[-1]})"
            )
