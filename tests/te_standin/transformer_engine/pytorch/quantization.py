"""TE stand-in for pytorch/quantization.py (d0067d0da): support checks, QuantizerRole,
get_align_size_for_quantization, autocast / fp8_autocast and the global state the Linear reads.

Support checks follow TE's rules and messages, CUDA and cuBLASLt conditions included
(_compute_*_support, quantization.py:149-186). TE caches them per process (:189-223); the
stand-in recomputes so tests can change the pretended GPU. torch.version.cuda is None on a CPU
build and there is no tex.get_cublasLt_version(), so the stand-in pretends ``CUDA_VERSION``
and ``CUBLASLT_VERSION`` (tests may change them).
"""

from __future__ import annotations

import dataclasses
import warnings

from transformer_engine.common.recipe import (
    CustomRecipe,
    Float8BlockScaling,
    Float8CurrentScaling,
    MXFP8BlockScaling,
    NVFP4BlockScaling,
    Recipe,
)

from .utils import get_device_compute_capability

CUDA_VERSION = 12.9  # float(torch.version.cuda) on the pretended machine
CUBLASLT_VERSION = 120900  # tex.get_cublasLt_version()


@dataclasses.dataclass(frozen=True)
class QuantizerRole:  # quantization.py:56-84
    module_type: str = ""
    tensor_type: str = ""
    name: str = ""


def check_fp8_support() -> tuple[bool, str]:  # quantization.py:149-159
    cap = get_device_compute_capability()
    if cap >= (9, 0):
        return True, ""
    if cap < (8, 9):
        return False, "Device compute capability 8.9 or higher required for FP8 execution."
    if CUBLASLT_VERSION < 120103:
        return False, "CublasLt version 12.1.3.x or higher required for FP8 execution on Ada."
    if CUDA_VERSION < 12.1:
        return False, "Cuda version 12.1 or higher required for FP8 execution on Ada."
    return True, ""


def check_mxfp8_support() -> tuple[bool, str]:  # quantization.py:162-168
    cap = get_device_compute_capability()
    if cap >= (12, 0):
        return False, "MXFP8 (for all gemm layouts) is not supported on 12.0+ architectures yet."
    if cap >= (10, 0):
        return True, ""
    return False, "Device compute capability 10.0 or higher required for MXFP8 execution."


def check_nvfp4_support() -> tuple[bool, str]:  # quantization.py:171-175
    if get_device_compute_capability() >= (10, 0):
        return True, ""
    return False, "Device compute capability 10.0 or higher required for NVFP4 execution."


def check_fp8_block_scaling_support() -> tuple[bool, str]:  # quantization.py:178-186
    if get_device_compute_capability() >= (9, 0) and CUDA_VERSION >= 12.9:
        return True, ""
    return False, "FP8 block scaled GEMM requires compute capability 9.0 or higher and CUDA >= 12.9."


def get_align_size_for_quantization(recipe: Recipe) -> int:  # quantization.py:262-279
    if recipe.custom():
        return recipe.quantization_alignment
    if recipe.mxfp8():
        return 32
    if recipe.nvfp4():
        return 128
    return 16


def _avail(check, return_reason: bool):
    return check() if return_reason else check()[0]


def is_fp8_available(return_reason: bool = False):
    return _avail(check_fp8_support, return_reason)


def is_mxfp8_available(return_reason: bool = False):
    return _avail(check_mxfp8_support, return_reason)


def is_fp8_block_scaling_available(return_reason: bool = False):
    return _avail(check_fp8_block_scaling_support, return_reason)


def is_nvfp4_available(return_reason: bool = False):
    return _avail(check_nvfp4_support, return_reason)


def check_recipe_support(recipe: Recipe) -> None:  # quantization.py:224-240
    ok, reason = True, ""
    if isinstance(recipe, Float8CurrentScaling):
        ok, reason = check_fp8_support()
    elif isinstance(recipe, Float8BlockScaling):
        ok, reason = check_fp8_block_scaling_support()
    elif isinstance(recipe, MXFP8BlockScaling):
        ok, reason = check_mxfp8_support()
    if not ok:
        raise RuntimeError(reason)


class FP8GlobalStateManager:
    """The part of TE's global quantization state the stand-in Linear reads."""

    enabled = False
    recipe: Recipe | None = None

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.enabled

    @classmethod
    def get_fp8_recipe(cls) -> Recipe | None:
        return cls.recipe


class autocast:  # noqa: N801 - TE's name; quantization.py:972-1060
    """TE's ``autocast(enabled, calibrating, recipe, amax_reduction_group, _graph)`` context manager."""

    def __init__(
        self,
        enabled: bool = True,
        calibrating: bool = False,
        recipe: Recipe | None = None,
        amax_reduction_group=None,
        _graph: bool = False,
    ) -> None:
        if calibrating or _graph or amax_reduction_group is not None:
            raise NotImplementedError("TE stand-in: calibrating, _graph and amax_reduction_group are not modelled")
        if enabled and recipe is None:
            raise NotImplementedError("TE stand-in: pass a recipe (TE would pick its default FP8 recipe)")
        self._enabled, self._recipe, self._saved = enabled, recipe, None

    def __enter__(self) -> autocast:
        if self._saved is not None:
            raise RuntimeError("autocast context manager cannot be entered more than once concurrently")
        if self._enabled:
            check_recipe_support(self._recipe)
        self._saved = (FP8GlobalStateManager.enabled, FP8GlobalStateManager.recipe)
        FP8GlobalStateManager.enabled, FP8GlobalStateManager.recipe = self._enabled, self._recipe
        if self._enabled:  # FP8GlobalStateManager.autocast_enter's asserts (quantization.py:730-770)
            ok, why = check_fp8_support()
            assert ok, why
            for cls, check in (
                (MXFP8BlockScaling, check_mxfp8_support),
                (Float8BlockScaling, check_fp8_block_scaling_support),
                (NVFP4BlockScaling, check_nvfp4_support),
            ):
                if isinstance(self._recipe, cls):
                    ok, why = check()
                    assert ok, why
        return self

    def __exit__(self, *exc) -> None:
        FP8GlobalStateManager.enabled, FP8GlobalStateManager.recipe = self._saved
        self._saved = None


def fp8_autocast(  # quantization.py:941-970
    enabled: bool = True,
    calibrating: bool = False,
    fp8_recipe: Recipe | None = None,
    fp8_group=None,
    _graph: bool = False,
) -> autocast:
    warnings.warn(
        "fp8_autocast is deprecated and will be removed in a future release. "
        "Use autocast(enabled=..., calibrating=..., recipe=..., group=..., _graph=...) instead.",
        category=DeprecationWarning,
        stacklevel=2,
    )
    return autocast(
        enabled=enabled, calibrating=calibrating, recipe=fp8_recipe, amax_reduction_group=fp8_group, _graph=_graph
    )


__all__ = [
    "CustomRecipe",
    "QuantizerRole",
    "autocast",
    "fp8_autocast",
    "is_fp8_available",
    "is_fp8_block_scaling_available",
    "is_mxfp8_available",
    "is_nvfp4_available",
]
