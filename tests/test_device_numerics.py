"""Same bits on every device by construction (docs/numerics.md): checked on a CPU-only machine.

1. Every numerics kernel is compiled with inductor's eager-numerics settings, and under them
   inductor's Triton code generator emits IEEE division (div_rn), not the approximate div.full.f32.
2. A quantization makes no host-to-device copy and no device-to-host read: counted with a
   dispatch mode on the "meta" device (a non-CPU device that needs no GPU).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hf_nvfp4
from hf_nvfp4.formats import _compile, get_format
from hf_nvfp4.formats._compile import COMPILE_OPTIONS

PKG = Path(hf_nvfp4.__file__).parent


def test_every_kernel_compiles_with_eager_numerics(monkeypatch):
    seen = []
    real = torch.compile

    def spy(fn, **kw):
        seen.append(kw.get("options") or {})
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)

    @_compile.fused
    def kernel(x):
        return torch.reciprocal(x * 3.0)

    @_compile.fused(serial=True)
    def serial_kernel(x):
        return 1.0 / x

    with _compile.compile_mode("1"):
        x = torch.rand(64) + 0.5
        assert torch.equal(kernel(x), kernel.eager(x)) and torch.equal(serial_kernel(x), serial_kernel.eager(x))
    assert len(seen) == 2 and all(COMPILE_OPTIONS.items() <= o.items() for o in seen)
    # ... and nothing in the package compiles outside that decorator
    users = [p.name for p in PKG.rglob("*.py") if "torch.compile(" in p.read_text() and p.name != "_compile.py"]
    assert users == []


def test_triton_division_is_correctly_rounded_under_our_options():
    """Inductor's Triton backend (the GPU one) lowers fp32 x / y, and reciprocal (as 1 / x), to
    div.full.f32 (approximate, up to 2 ulp) by default and to div_rn with our options."""
    pytest.importorskip("torch._inductor.codegen.triton")
    from torch._inductor import config
    from torch._inductor.codegen.triton import TritonOverrides

    class Var:
        dtype = torch.float32

        def __init__(self, name):
            self.name = name

        def __str__(self):
            return self.name

    assert TritonOverrides.truediv(Var("a"), Var("b")) == "(a / b)"  # the approximate default
    with config.patch(COMPILE_OPTIONS):
        assert TritonOverrides.truediv(Var("a"), Var("b")) == "triton.language.div_rn(a, b)"
        assert config.eager_numerics.disable_ftz and config.emulate_precision_casts


class _Transfers(TorchDispatchMode):
    """Counts CPU -> device copies and device -> host reads (.item()) among dispatched ops."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device.type != "cpu":
                self.events.append(f"host-to-device copy of {tuple(src.shape)}")
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.events.append("device-to-host read")
        return out


def test_no_host_device_transfer_per_quantization():
    # meta tensors run the eager kernels (the compiled ones compute the same)
    with _compile.compile_mode("0"):
        x = torch.empty(64, 128, device="meta")
        cases = {
            "nvfp4": lambda: hf_nvfp4.quantize_nvfp4(x),
            "nvfp4 16x16": lambda: hf_nvfp4.quantize_nvfp4(x, tile=(16, 16)),
            "nvfp4 SR": lambda: hf_nvfp4.quantize_nvfp4(x, stochastic=True),
            "nvfp4 RHT": lambda: hf_nvfp4.quantize_nvfp4(x.t(), rht=True),
            "nvfp4 fake SR": lambda: hf_nvfp4.fake_quantize_nvfp4(x, stochastic=True),
            "nvfp4 dequantize": lambda: hf_nvfp4.quantize_nvfp4(x).dequantize(),
            **{f"{f} fake": (lambda f=f: get_format(f).fake_quantize(x)) for f in ("mxfp4", "mxfp8", "fp8_block",
                                                                                  "fp8_tensor")},
        }
        for fn in cases.values():
            fn()  # first calls may build per-device constants once
        for name, fn in cases.items():
            rec = _Transfers()
            with rec:
                fn()
            assert rec.events == [], name


def test_no_tensor_constant_built_on_the_device_per_call():
    """``torch.tensor(..., device=...)`` copies from the host; in the numerics only cached tables may."""
    found = []
    for path in (PKG / "formats").glob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            cached = any("cache" in ast.unparse(d) for d in fn.decorator_list)
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.tensor"
                        and any(k.arg == "device" for k in node.keywords) and not cached):
                    found.append(f"{path.name}:{node.lineno}")
    assert found == []
