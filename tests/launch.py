"""Run a test script in a fresh process: plain python, or ``accelerate launch`` with a shipped config."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from hf_nvfp4.recipe import RECIPE_DIR


def run_script(script, args, *, cwd, pythonpath, accelerate_config=None) -> subprocess.CompletedProcess:
    """Run ``script args`` one thread per process; assert it exits 0 (its stderr tail otherwise)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(pythonpath))
    if accelerate_config is None:
        cmd = [sys.executable, str(script), *args]
    else:
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
        cmd = [accelerate, "launch", "--config_file", str(RECIPE_DIR / "accelerate" / accelerate_config),
               str(script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return res
