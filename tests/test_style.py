import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
    reason="ruff is installed with the [test] extra",
)
def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    dirs = [d for d in ("hf_nvfp4", "tests", "benchmarks", "examples", "tools") if (ROOT / d).is_dir()]
    out = subprocess.run([ruff, "check", *dirs], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

# The layering rule (formats -> config -> ops -> nn -> integrations -> science and app -> cli) is
# checked on the import graph, parsed from the sources, in test_architecture.py.
