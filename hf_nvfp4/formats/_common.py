"""Shared helpers for the formats: input checks, 2D views, padding, one-time notices."""

from __future__ import annotations

import logging
import math
import operator
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger("hf_nvfp4")

FLT_MAX = torch.finfo(torch.float32).max
E4M3_MAX = 448.0
HIGH_PRECISION = (torch.float32, torch.bfloat16, torch.float16)
# what dequantize may return: float64 too (exact), never an integer or FP8 type (silent truncation)
DEQUANT_DTYPES = (*HIGH_PRECISION, torch.float64)
MAX_RHT_SIZE = 256  # as NVFP4Recipe.rht_size: the paper studied 16-128; larger sizes cost O(size) per element
_said: set[str] = set()


def _is_rank_zero() -> bool:
    """True unless this is a non-zero rank of a distributed run (torch.distributed or RANK)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") in ("", "0")


def say_once(key: str, msg: str) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process, on rank 0 only."""
    if key not in _said:
        _said.add(key)
        if _is_rank_zero():
            logger.warning(msg)


def check_input(x: object, fn: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in HIGH_PRECISION:
        raise TypeError(
            f"{fn}: input dtype {x.dtype} is not supported; pass float32, bfloat16 or float16 (e.g. x.float())"
        )
    if x.ndim == 0:
        raise ValueError(f"{fn}: input must have at least one dimension, got a 0-dim tensor")
    return x


def check_tile(tile: object, allowed: tuple[tuple[int, int], ...], fn: str) -> tuple[int, int]:
    try:  # a str is a sequence too: "16" must not read as (1, 6)
        if isinstance(tile, (str, bytes)) or len(tile) != 2 or any(isinstance(v, bool) for v in tile):  # type: ignore[arg-type]
            raise TypeError
        t = (operator.index(tile[0]), operator.index(tile[1]))  # type: ignore[index]
    except TypeError:
        raise ValueError(f"{fn}: tile must be a pair of ints such as {allowed[0]}, got {tile!r}") from None
    if t not in allowed:
        raise ValueError(f"{fn}: tile {t} is not supported; use one of {list(allowed)}")
    return t


def check_generator(generator: object, fn: str) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{fn}: generator must be a torch.Generator or None, got {type(generator).__name__} {generator!r}; "
            "for a seed write torch.Generator().manual_seed(seed)"
        )
    return generator


def shape_2d(x: torch.Tensor) -> tuple[int, int]:
    """The shape :func:`as_2d` would give, without copying a non-contiguous ``x``."""
    return math.prod(x.shape[:-1]), x.shape[-1]


def as_2d(x: torch.Tensor) -> torch.Tensor:
    """Flatten all leading dims: [..., K] -> [M, K] (empty tensors included)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).contiguous()


def pad_2d(x2: torch.Tensor, tile: tuple[int, int], fn: str) -> torch.Tensor:
    """Zero-pad rows to a multiple of tile[0] and columns to a multiple of tile[1].

    Zeros never change a block's amax, so padded and partial blocks quantize alike.
    """
    m, k = x2.shape
    pad_m, pad_k = (-m) % tile[0], (-k) % tile[1]
    if pad_k:
        say_once(
            f"pad-k-{tile[1]}",
            f"hf_nvfp4: {fn}: last dim {k} is not a multiple of the block size {tile[1]}; "
            "zero-padding the last block (results are cropped back to the input shape)",
        )
    if pad_m or pad_k:
        x2 = F.pad(x2, (0, pad_k, 0, pad_m))
    return x2


def check_amax(amax: object, fn: str) -> torch.Tensor | None:
    if amax is None:
        return None
    a = torch.as_tensor(amax, dtype=torch.float32).detach()  # documented: results never require grad
    if a.numel() != 1:
        raise ValueError(f"{fn}: amax must be a scalar (one element), got shape {tuple(a.shape)}")
    if a.device.type == "cpu":  # no GPU sync
        v = float(a.reshape(()))
        if not math.isfinite(v) or v < 0:  # NaN would make every scale NaN, Inf every scale 0
            raise ValueError(
                f"{fn}: amax must be a finite number >= 0 (it is a max of absolute values), got {v}; "
                "leave amax=None to take it from the tensor"
            )
    return a.reshape(())


def check_rht_size(rht_size: object, fn: str) -> int:
    """A power of two from 2 to MAX_RHT_SIZE (the recipe's bound), as an int."""
    ok = isinstance(rht_size, int) and not isinstance(rht_size, bool)
    if not ok or rht_size < 2 or rht_size & (rht_size - 1) or rht_size > MAX_RHT_SIZE:  # type: ignore[operator]
        raise ValueError(
            f"{fn}: rht_size must be a power of two from 2 to {MAX_RHT_SIZE} (the paper uses 16), got {rht_size!r}"
        )
    return rht_size  # type: ignore[return-value]


def check_dequant_dtype(dtype: object, fn: str) -> torch.dtype:
    if dtype not in DEQUANT_DTYPES:
        raise TypeError(
            f"{fn}: dtype must be one of {[str(d) for d in DEQUANT_DTYPES]}, got {dtype!r}; "
            "the values are not integers, and a cast to an integer or FP8 type would silently change them"
        )
    return dtype  # type: ignore[return-value]
