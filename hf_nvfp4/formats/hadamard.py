"""The signed (random) Hadamard transform applied to Wgrad operands."""

from __future__ import annotations

import functools

import torch

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


def hadamard_matrix(size: int = 16, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """``diag(s) @ H_size / sqrt(size)``: orthogonal, so ``H @ H.T == I``."""
    if size < 2 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two >= 2, got {size}")
    return _matrix(size, dtype, torch.device(device) if device is not None else torch.device("cpu"))


def hadamard_transform(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Apply the signed Hadamard transform blockwise along the last dim: ``x.view(-1, size) @ H``.

    Computed in ``x``'s dtype, as TE's reference does (so bf16 inputs give bf16 outputs).

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
    if size < 2 or size & (size - 1):
        raise ValueError(f"Hadamard size must be a power of two >= 2, got {size}")
    if x.ndim == 0 or x.shape[-1] % size:
        raise ValueError(
            f"hadamard_transform: the last dim of shape {tuple(x.shape)} must be a multiple of "
            f"size={size}; pad it with zeros first (the transform is orthogonal, so zero padding "
            "on both GEMM operands leaves their product unchanged)"
        )
    h = hadamard_matrix(size, x.dtype, x.device)
    with torch.autocast(x.device.type, enabled=False):  # in x's dtype even inside a bf16 autocast region
        return (x.reshape(-1, size) @ h).view(x.shape)
