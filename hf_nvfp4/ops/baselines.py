"""The paper's comparison recipes, built from the same fields as the NVFP4 recipe.

FP8 baseline (arXiv 2509.25149, and /work/shared/spec): E4M3 with 1x128 activation/gradient blocks
and 128x128 weight blocks (``format="fp8_block"``); its 12B model (62 blocks) keeps the first block
and the last 2 blocks in BF16, about 5% of the blocks. A 4-block model with "first 1 + last 2"
would be 75% BF16, which mixes number format with layer allocation; so the allocation here is a
*share* of the model's blocks (1/62 first, 2/62 last, rounded), or, with ``allocation="nvfp4"``,
exactly the NVFP4 recipe's blocks (format alone differs).

MXFP4 (the paper's §5 comparison): 1x32 blocks with UE8M0 scales rounded up (``format="mxfp4"``),
a 32-point RHT on the Wgrad operands, otherwise the NVFP4 method (stochastic rounding of
gradients, 2D weight scaling: here 32x32 tiles, the MX block edge, and the same BF16 blocks).

>>> paper_fp8_bf16_blocks(62), paper_fp8_bf16_blocks(32), paper_fp8_bf16_blocks(4)
((1, 2), (1, 1), (0, 0))
>>> mxfp4_paper_recipe(NVFP4Recipe()).rht_size
32
"""

from __future__ import annotations

import math

from ..config import NVFP4Recipe, as_recipe

PAPER_FP8_BLOCKS = 62  # the 12B model's blocks
PAPER_FP8_BF16_FIRST = 1  # of 62, kept in BF16 at the start
PAPER_FP8_BF16_LAST = 2  # of 62, kept in BF16 at the end
FP8_ALLOCATIONS = ("paper", "nvfp4")
MXFP4_RHT_SIZE = 32


def paper_fp8_bf16_blocks(n_blocks: int) -> tuple[int, int]:
    """(first, last) BF16 blocks of the FP8 baseline for ``n_blocks``: the paper's 1 + 2 of 62 as a share."""
    if not isinstance(n_blocks, int) or n_blocks < 0:
        raise ValueError(f"n_blocks must be an int >= 0, got {n_blocks!r}")
    first = math.floor(n_blocks * PAPER_FP8_BF16_FIRST / PAPER_FP8_BLOCKS + 0.5)  # rounded half up
    last = math.floor(n_blocks * PAPER_FP8_BF16_LAST / PAPER_FP8_BLOCKS + 0.5)
    return first, min(last, n_blocks - first)


def fp8_baseline_recipe(n_blocks: int, allocation: str = "paper", like=None, **changes) -> NVFP4Recipe:
    """The FP8 baseline recipe for a model of ``n_blocks`` blocks.

    allocation: ``"paper"`` (the paper's share of blocks in BF16, about 5%) or ``"nvfp4"`` (the
    BF16 blocks of ``like``, the NVFP4 recipe it is compared with, so that only the format differs).

    >>> fp8_baseline_recipe(4, "nvfp4", like=NVFP4Recipe(bf16_last_blocks=1)).resolved_bf16_blocks(4)
    (0, 1)
    """
    if allocation not in FP8_ALLOCATIONS:
        raise ValueError(f"FP8 baseline allocation must be one of {FP8_ALLOCATIONS}, got {allocation!r}")
    if allocation == "paper":
        first, last = paper_fp8_bf16_blocks(n_blocks)
    else:
        first, last = as_recipe(like).resolved_bf16_blocks(n_blocks)
    seed = as_recipe(like).seed if like is not None else 0
    return NVFP4Recipe.for_format(
        "fp8_block", **{"bf16_first_blocks": first, "bf16_last_blocks": last, "seed": seed, **changes}
    )


def mxfp4_paper_recipe(like=None, **changes) -> NVFP4Recipe:
    """The paper's MXFP4 comparison: ``like`` (default: the NVFP4 recipe) in MXFP4 with a 32-point RHT."""
    base = as_recipe(like)
    return base.replace(**{"format": "mxfp4", "rht_size": MXFP4_RHT_SIZE, **changes})


__all__ = [
    "FP8_ALLOCATIONS",
    "MXFP4_RHT_SIZE",
    "fp8_baseline_recipe",
    "mxfp4_paper_recipe",
    "paper_fp8_bf16_blocks",
]
