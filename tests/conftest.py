import logging
import os

import pytest
import torch

from hf_nvfp4.formats import _compile

# The suite runs the numerics kernels eagerly, in this process and in the processes it starts (the
# CLI, DDP/FSDP2 launches, fresh-process checks): tracing and compiling them is most of the time of
# a cold machine's run (CI) and not what those tests test. The eager path computes the same bits;
# the fused path is tested where it is the subject, in mode "1": test_nvfp4's eager_and_fused
# comparisons, test_compile_shapes (no fallback over many shapes) and test_device_numerics.
# HF_NVFP4_COMPILE set by the caller wins (HF_NVFP4_COMPILE=auto python -m pytest: the product's default).
os.environ.setdefault("HF_NVFP4_COMPILE", "0")
_compile.set_compile_mode(os.environ["HF_NVFP4_COMPILE"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def eager_and_fused():
    """Run a test body under both kernel modes."""

    def run(fn):
        out = []
        for mode in ("0", "1"):
            with _compile.compile_mode(mode):
                out.append(fn())
        return out

    return run


logging.getLogger("hf_nvfp4").setLevel(logging.ERROR)
