"""benchmarks/gpu_check.py runs on a CPU-only machine in its reduced form and says what it skipped."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_check  # noqa: E402


def test_reduced_form_runs_and_skips_cuda_with_a_message(capsys):
    if torch.cuda.is_available():  # the full check is for a GPU owner to run by hand (minutes)
        return
    state = torch.random.get_rng_state()
    assert gpu_check.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "CUDA not available: skipping the CUDA-vs-CPU comparison" in out
    assert "bit-identical" in out and "MISMATCH" not in out
    assert "hidden-4096 training step: skipped" in out
    verdict = out.split("VERDICT")[1]
    assert "quantizer bits compiled vs eager (CPU)  PASS" in verdict and "FAIL" not in verdict
    assert "TE vs emulation per GEMM" in verdict
    torch.random.set_rng_state(state)


def test_mismatch_counter_sees_one_flipped_bit():
    a = torch.randn(64, dtype=torch.bfloat16)
    b = a.clone()
    b.view(torch.int16)[5] ^= 1
    assert gpu_check.mismatches(a, a.clone()) == 0 and gpu_check.mismatches(a, b) == 1
    nan = torch.tensor([float("nan"), -0.0])
    assert gpu_check.mismatches(nan, torch.tensor([float("nan"), 0.0])) == 1  # -0 != +0, NaN == NaN
