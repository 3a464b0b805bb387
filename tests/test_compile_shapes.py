"""Issue 24: the fused kernels are shape-generic. Many widths and sequence lengths in one process
compile each kernel a bounded number of times, and nothing falls back to the eager path."""

import logging

import torch
import torch._dynamo.utils as dynamo_utils

import hf_nvfp4
from hf_nvfp4.formats import _compile
from hf_nvfp4.formats._compile import compile_mode, fallbacks, fused


def _step(width: int, seq: int) -> None:
    layer = hf_nvfp4.NVFP4Linear(width, 2 * width)
    x = torch.randn(2, seq, width, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    with torch.no_grad():
        layer(x)


def test_many_widths_and_lengths_compile_a_bounded_number_of_times_without_fallback():
    with compile_mode("1"):
        _step(64, 16)  # first shapes: every kernel compiles (dims dynamic from the start)
        _step(96, 48)  # a second size may still specialise once
        _step(256, 160)  # above SERIAL_BELOW: the two-thread variants compile once too
        _step(64, 8)  # 16 tokens: a Wgrad operand of one block per row specialises once (size 0/1)
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        for width in (128, 320):
            for seq in (8, 40, 72):
                _step(width, seq)
        new_graphs = dynamo_utils.counters["stats"]["unique_graphs"] - before
    assert fallbacks() == {}, fallbacks()
    # 6 new shapes: a guard on a size or on a view's base strides would compile each kernel anew
    assert new_graphs <= 4, f"{new_graphs} kernels compiled anew for new shapes"


def test_a_compiler_failure_falls_back_visibly_with_the_same_result(monkeypatch, caplog):
    """A kernel whose compilation fails runs eagerly from then on, and says so once, with the cost."""
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor exploded\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(_compile, "_FALLBACKS", {})  # this process's record stays clean

    @fused
    def double_kernel(x):
        return x * 2

    x = torch.arange(8.0)
    with compile_mode("1"), caplog.at_level(logging.WARNING, logger="hf_nvfp4"):
        first, second = double_kernel(x), double_kernel(x)
    assert torch.equal(first, x * 2) and torch.equal(second, x * 2)
    assert fallbacks() == {"double_kernel": "RuntimeError: inductor exploded"}
    warnings = [r.getMessage() for r in caplog.records if "double_kernel" in r.getMessage()]
    assert len(warnings) == 1 and "slower" in warnings[0] and "HF_NVFP4_COMPILE=0" in warnings[0]


def test_meta_tensors_run_eagerly_and_leave_the_kernels_compiled(monkeypatch):
    """A meta tensor (a model built on the meta device) has no data to compile for: it takes the eager
    path for its shapes, and the kernels stay compiled for the real tensors after it."""
    monkeypatch.setattr(_compile, "_FALLBACKS", {})  # only what this test causes
    with compile_mode("1"):
        y = hf_nvfp4.fake_quantize_nvfp4(torch.randn(64, 64, device="meta"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hf_nvfp4.fake_quantize_nvfp4(torch.randn(64, 64))
    assert y.shape == (64, 64) and y.device.type == "meta"
    assert fallbacks() == {}, fallbacks()
