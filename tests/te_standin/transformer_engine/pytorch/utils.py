"""TE stand-in for pytorch/utils.py (d0067d0da): the two helpers the stand-in Linear uses."""

from __future__ import annotations

import math

import torch


def get_device_compute_capability() -> tuple[int, int]:
    """(major, minor) of the current device (tests monkeypatch torch.cuda.get_device_capability)."""
    return tuple(torch.cuda.get_device_capability())


def assert_dim_for_fp8_exec(*tensors: torch.Tensor) -> None:
    """utils.py:614-624, called from module/linear.py:375-376; same message."""
    for tensor in tensors:
        if math.prod(tensor.shape[:-1]) % 8 != 0 or tensor.shape[-1] % 16 != 0:
            raise ValueError(
                "FP8 execution requires the product of all dimensions except the last to be"
                " divisible by 8 and the last dimension to be divisible by 16, but got tensor"
                f" with dims={list(tensor.size())} (product of leading dims ="
                f" {math.prod(tensor.shape[:-1])}, last dim = {tensor.shape[-1]})"
            )
