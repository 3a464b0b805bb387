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

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator

import torch

logger = logging.getLogger("hf_nvfp4")

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
# Below this many elements a kernel runs eagerly (a few whole-tensor ops). Dims are dynamic, so one
# compiled kernel serves every size: a small tensor costs no new compilation, and compiled it runs
# as one loop instead of a dozen eager passes (the tiny-cpu step: 1.85x -> 1.36x, issue 24).
MIN_FUSED_NUMEL = 1 << 12
# Compiled variants one kernel may build (dtypes x layouts x 0/1 specialisations): dims are dynamic,
# so more than a few means a guard on something that should not be guarded, which a test catches.
RECOMPILE_LIMIT = 32
_MODES = ("auto", "1", "0")
# kernel name -> why it fell back to eager in this process (see :func:`fallbacks`)
_FALLBACKS: dict[str, str] = {}
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


@contextlib.contextmanager
def compile_mode(mode: str) -> Iterator[None]:
    """Run a block in one compile mode; the previous mode is restored after, also on error.

    >>> from hf_nvfp4.formats._compile import compile_mode, get_compile_mode
    >>> with compile_mode("0"):
    ...     get_compile_mode()
    '0'
    """
    before = _mode
    set_compile_mode(mode)
    try:
        yield
    finally:
        set_compile_mode(before)


def fallbacks() -> dict[str, str]:
    """Kernels that fell back to the eager path in this process, with the reason (empty: none).

    >>> from hf_nvfp4.formats._compile import fallbacks
    >>> isinstance(fallbacks(), dict)
    True
    """
    return dict(_FALLBACKS)


def _detached(a):
    # A view's base strides would be guarded (one recompile per base layout, until the limit);
    # a detached alias has no base, so one kernel serves every layout of the same view.
    return a.detach() if isinstance(a, torch.Tensor) and a._is_view() else a


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know
        return False


def fused(fn: Callable | None = None, *, dims: tuple[int, ...] = (0,), serial: bool | int = False,
          scale: int = 1) -> Callable:
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

    ``scale``: elements of the quantized tensor per element of the first argument (16 for a
    per-block kernel), so the size test in ``auto`` mode is on the tensor being quantized.
    """
    if fn is None:
        return lambda f: fused(f, dims=dims, serial=serial, scale=scale)
    state: dict = {"compiled": None, "serial": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(*args):
        if _mode not in _MODES:
            raise ValueError(f"HF_NVFP4_COMPILE must be one of {_MODES}, got {_mode!r}")
        use = _mode == "1" or (_mode == "auto" and args[0].numel() * scale >= MIN_FUSED_NUMEL)
        dev = args[0].device.type
        # meta and empty tensors carry no data: the eager ops give their shapes, at no cost
        if not use or state["failed"] or dev == "meta" or not args[0].numel() or torch.compiler.is_compiling():
            return fn(*args)
        one_thread = serial is True or (serial is not False and args[0].numel() < serial)
        key = "serial" if one_thread else "compiled"
        if state[key] is None:
            opts = {**COMPILE_OPTIONS, "cpp.threads": 1} if one_thread else dict(COMPILE_OPTIONS)
            state[key] = torch.compile(fn, fullgraph=True, recompile_limit=RECOMPILE_LIMIT, options=opts)
        args = tuple(_detached(a) for a in args)
        for a in args:
            if isinstance(a, torch.Tensor):
                for d in dims:
                    if d < a.ndim and a.shape[d] > 1:
                        torch._dynamo.maybe_mark_dynamic(a, d)
        try:
            if _autocast_on(dev):  # elementwise kernels: autocast changes nothing but it is
                with torch.autocast(dev, enabled=False):  # guarded, so it would double the graphs
                    return state[key](*args)
            return state[key](*args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back
            state["failed"] = True
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _FALLBACKS[fn.__name__] = why
            logger.warning(
                "hf_nvfp4: torch.compile failed for the NVFP4 kernel %s (%s); from now on this process "
                "runs it eagerly: the same bits, but one pass becomes a dozen or more (typically 5-30x "
                "slower for this kernel, and a training step 2-4x slower). Please report it; set "
                "HF_NVFP4_COMPILE=0 to run eagerly on purpose and silence this.",
                fn.__name__,
                why,
            )
            return fn(*args)

    wrapper.eager = fn  # type: ignore[attr-defined]
    return wrapper
