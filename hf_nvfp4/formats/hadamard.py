"""The signed (random) Hadamard transform applied to Wgrad operands.

Each output is a signed sum of ``size`` inputs: the products with ``+-1`` are exact, the sum is
taken in fp32 in one fixed order (four partial sums over every fourth input, then added left to
right, which is what torch's bf16 CPU matmul does), times ``1/sqrt(size)`` rounded to fp32, then
rounded once to the input's dtype. A fixed order gives the same bits on every CPU and GPU, which
a BLAS call does not promise; for bf16 and fp16 inputs of size 16 the bits equal the old matmul.
Written with elementwise ops only, the transform fuses into one kernel that also reads a
transposed operand in place (the Wgrad operands are ``x^T`` and ``dy^T``).
"""

from __future__ import annotations

import functools
import math

import torch

from ._common import MAX_RHT_SIZE
from ._compile import fused

# One fixed sign vector for every layer and the whole run (TE's wgrad sign vector).
RHT_SIGNS_16 = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)


@functools.lru_cache(maxsize=32)
def _matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < size:  # Sylvester construction
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.tensor(RHT_SIGNS_16 if size == 16 else _signs(size), dtype=torch.float32)
    h = (signs[:, None] * h) * (1.0 / size**0.5)
    return h.to(dtype=dtype, device=device)


def _signs(size: int) -> tuple[int, ...]:
    # Sizes other than 16 (ablations) repeat the 16-sign pattern; size < 16 takes its head.
    return tuple(RHT_SIGNS_16[i % 16] for i in range(size))


def _check_size(size: object) -> None:
    ok = isinstance(size, int) and not isinstance(size, bool)
    if not ok or size < 2 or size & (size - 1) or size > MAX_RHT_SIZE:  # type: ignore[operator]
        raise ValueError(f"Hadamard size must be a power of two from 2 to {MAX_RHT_SIZE}, got {size!r}")


def hadamard_matrix(size: int = 16, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``diag(s) @ H_size / sqrt(size)``: orthogonal, so ``H @ H.T == I``."""
    _check_size(size)
    return _matrix(size, dtype, torch.device(device) if device is not None else torch.device("cpu"))


def _fixed_order_sum(xf: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """sum_k xf[..., k] * signs[k, :] over the last dim, in the documented order (exact products)."""
    size = xf.shape[-1]
    lanes = min(4, size)
    acc = [xf[..., k : k + 1] * signs[k] for k in range(lanes)]
    for k in range(lanes, size):
        acc[k % lanes] = acc[k % lanes] + xf[..., k : k + 1] * signs[k]
    out = acc[0]
    for a in acc[1:]:
        out = out + a
    return out


@fused(dims=(0, 1))
def _transform(xg: torch.Tensor, signs: torch.Tensor, scale: float) -> torch.Tensor:
    """Groups [R, G, size] (any strides) -> transformed groups, contiguous, in xg's dtype."""
    acc = xg.double() if xg.dtype == torch.float64 else xg.float()
    return (_fixed_order_sum(acc, signs.to(acc.dtype)) * scale).to(xg.dtype).contiguous()


@functools.lru_cache(maxsize=32)
def _sign_matrix(size: int, device: torch.device) -> torch.Tensor:
    return torch.sign(_matrix(size, torch.float32, torch.device("cpu"))).to(device)


def _scale(size: int) -> float:
    """1/sqrt(size) rounded to fp32 (exact for 16 and 64), as a Python float."""
    return float(torch.tensor(1.0 / math.sqrt(size), dtype=torch.float32))


def hadamard_transform(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Apply the signed Hadamard transform blockwise along the last dim (``x.view(-1, size) @ H``).

    Computed in fp32 in a fixed order and rounded once to ``x``'s dtype (module docstring), so
    bf16 inputs give bf16 outputs, the same bits on every device, inside autocast or not. ``x``
    may be non-contiguous (a transposed operand is read in place); the result is contiguous.

    >>> import torch, hf_nvfp4
    >>> x = torch.randn(4, 32)
    >>> y = hf_nvfp4.hadamard_transform(x)
    >>> torch.allclose(y.norm(), x.norm())
    True
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(
            f"hadamard_transform needs a floating-point tensor, got {type(x).__name__}"
            f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}"
        )
    _check_size(size)
    if x.ndim == 0 or x.shape[-1] % size:
        raise ValueError(
            f"hadamard_transform: the last dim of shape {tuple(x.shape)} must be a multiple of "
            f"size={size}; pad it with zeros first (the transform is orthogonal, so zero padding "
            "on both GEMM operands leaves their product unchanged)"
        )
    x2 = x if x.ndim == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # a 2D view stays a view
    groups = x2.unflatten(-1, (-1, size))
    return _transform(groups, _sign_matrix(size, x.device), _scale(size)).view(x.shape)
