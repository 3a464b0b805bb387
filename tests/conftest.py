import logging

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def eager_and_fused():
    """Run a test body under both kernel modes."""
    import hf_nvfp4

    def run(fn):
        out = []
        for mode in ("0", "1"):
            hf_nvfp4.set_compile_mode(mode)
            try:
                out.append(fn())
            finally:
                hf_nvfp4.set_compile_mode("auto")
        return out

    return run


logging.getLogger("hf_nvfp4").setLevel(logging.ERROR)
