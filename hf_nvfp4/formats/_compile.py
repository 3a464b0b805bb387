"""Run a numerics kernel fused through torch.compile, or eagerly.

torch.compile turns each kernel into one C++ loop on the CPU and one Triton kernel on
a GPU, which is what makes emulation cheap. Small tensors run eagerly (compiling them
would cost more than it saves), and if compilation is unavailable or fails we fall back
to the eager path, which computes the same bits, and say so once.

Mode: ``HF_NVFP4_COMPILE`` = ``auto`` (default: fuse tensors of at least
``MIN_FUSED_NUMEL`` elements), ``1`` (always fuse) or ``0`` (never); or call
:func:`set_compile_mode`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("hf_nvfp4")

MIN_FUSED_NUMEL = 1 << 16
# Inductor settings every numerics kernel is compiled with, so that a kernel's bits do not depend on
# the backend (C++ on a CPU, Triton on a GPU; docs/numerics.md "Same bits on every device"): Triton
# lowers fp32 x / y to the approximate div.full.f32 unless division_rounding (then div_rn, as IEEE
# and C++ do), flushes fp32 subnormals to zero unless disable_ftz, and contracts a * b + c into an
# FMA unless emulate_precision_casts (which also rounds low-precision intermediates as eager does).
COMPILE_OPTIONS = {
    "eager_numerics.division_rounding": True,
    "eager_numerics.disable_ftz": True,
    "emulate_precision_casts": True,
}
_MODES = ("auto", "1", "0")
_mode = os.environ.get("HF_NVFP4_COMPILE", "auto").strip().lower() or "auto"


def set_compile_mode(mode: str) -> None:
    """Choose when numerics kernels are fused: ``"auto"``, ``"1"`` (always) or ``"0"`` (never).

    >>> import hf_nvfp4
    >>> hf_nvfp4.set_compile_mode("0")  # eager everywhere, e.g. while debugging
    >>> hf_nvfp4.set_compile_mode("auto")
    """
    global _mode
    mode = str(mode).strip().lower()
    if mode not in _MODES:
        raise ValueError(f"compile mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_compile_mode() -> str:
    return _mode


def fused(fn: Callable | None = None, *, dims: tuple[int, ...] = (0,), serial: bool | int = False) -> Callable:
    """Decorator: call ``fn`` compiled or eager, per the current mode.

    The first positional argument decides the size test. Only ``dims`` of the tensor
    arguments are compiled as dynamic sizes: block dims (16, 32, 128) stay static, so the
    inner loop is one fixed-width vector op, which is several times faster than a loop
    over a symbolic width.

    ``serial`` (True, or a size in elements of the first argument below which it applies):
    the CPU kernel runs on one thread. For per-block values (1/16 of the elements) and
    cheap memory-bound passes over moderate tensors, splitting gains little, while on a
    busy machine every parallel region can wait a scheduler tick (~4 ms) or more for its
    other threads (measured: a 2 ms quantization took 30 ms with two threads under load).
    """
    if fn is None:
        return lambda f: fused(f, dims=dims, serial=serial)
    state: dict = {"compiled": None, "serial": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(*args):
        if _mode not in _MODES:
            raise ValueError(f"HF_NVFP4_COMPILE must be one of {_MODES}, got {_mode!r}")
        use = _mode == "1" or (_mode == "auto" and args[0].numel() >= MIN_FUSED_NUMEL)
        if not use or state["failed"] or torch.compiler.is_compiling():
            return fn(*args)
        one_thread = serial is True or (serial is not False and args[0].numel() < serial)
        key = "serial" if one_thread else "compiled"
        if state[key] is None:
            opts = {**COMPILE_OPTIONS, "cpp.threads": 1} if one_thread else dict(COMPILE_OPTIONS)
            state[key] = torch.compile(fn, fullgraph=True, options=opts)
        for a in args:
            if isinstance(a, torch.Tensor):
                for d in dims:
                    if d < a.ndim and a.shape[d] > 1:
                        torch._dynamo.maybe_mark_dynamic(a, d)
        try:
            return state[key](*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
            state["failed"] = True
            logger.warning(
                "hf_nvfp4: torch.compile failed for %s (%s: %s); using the eager path, "
                "which gives the same bits but runs slower. Set HF_NVFP4_COMPILE=0 to "
                "silence this.",
                fn.__name__,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return fn(*args)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper
