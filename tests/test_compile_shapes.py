"""Issue 24: the fused kernels are shape-generic. Many widths and sequence lengths in one process
compile each kernel a bounded number of times, and nothing falls back to the eager path."""

import torch
import torch._dynamo.utils as dynamo_utils

import hf_nvfp4
from hf_nvfp4.formats._compile import fallbacks


def _step(width: int, seq: int) -> None:
    layer = hf_nvfp4.NVFP4Linear(width, 2 * width)
    x = torch.randn(2, seq, width, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    with torch.no_grad():
        layer(x)


def test_many_widths_and_lengths_compile_a_bounded_number_of_times_without_fallback():
    hf_nvfp4.set_compile_mode("1")
    try:
        _step(64, 16)  # first shapes: every kernel compiles (dims dynamic from the start)
        _step(96, 48)  # a second size may still specialise once
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        for width in (128, 320):
            for seq in (8, 40, 72):
                _step(width, seq)
        new_graphs = dynamo_utils.counters["stats"]["unique_graphs"] - before
    finally:
        hf_nvfp4.set_compile_mode("auto")
    assert fallbacks() == {}, fallbacks()
    # 6 new shapes: a guard on a size or on a view's base strides would compile each kernel anew
    assert new_graphs <= 4, f"{new_graphs} kernels compiled anew for new shapes"
