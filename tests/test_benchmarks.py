"""benchmarks/train_step.py runs end to end on a tiny model (its figures are not checked: timed
assertions do not belong in tests), and its profile finds the quantizers and GEMMs it labels."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_train_step_benchmark_runs_and_profiles_the_quantizers(dtype, capsys):
    ts = _load("train_step")
    res = ts.main(["--hidden", "64", "--intermediate", "128", "--seq", "16", "--vocab", "128",
                   "--repeats", "1", "--accumulate", "2", "--widths", "", "--dtype", dtype])
    prof = res["profile"]
    assert prof["quantize_ms"] > 0 and prof["gemm_ms"] > 0, prof
    assert set(res["train"]) == {"unconverted", "NVFP4 recipe (default BF16 blocks)", "NVFP4 every block (headline)"}
    assert "accumulate" in res and "inference" in res
    assert "kernels that fell back to eager: none" in capsys.readouterr().out
