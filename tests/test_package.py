"""The package installs like one: a wheel carries its recipes and tasks; runs leave the process as found."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(ROOT)],
        check=True, capture_output=True, text=True,
    )
    wheel = next((tmp / "dist").glob("hf_nvfp4-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"),
                    str(wheel)], check=True, capture_output=True, text=True)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    # the installed copy comes first; the source tree is not on the path (cwd is elsewhere)
    env = {**os.environ, "PYTHONPATH": str(tmp / "site")}
    return tmp, elsewhere, env


def _cli(args, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "hf_nvfp4.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_wheel_ships_recipes_and_runs_from_another_directory(installed):
    tmp, elsewhere, env = installed
    where = subprocess.run([sys.executable, "-c", "import hf_nvfp4; print(hf_nvfp4.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(tmp / "site")), where
    out = _cli(["recipes"], elsewhere, env)
    assert out.returncode == 0 and "tiny-cpu" in out.stdout and "ablation-cpu" in out.stdout, out.stderr
    run = elsewhere / "run"
    out = _cli(["train", "tiny-cpu", "--max-steps", "2", "--output-dir", str(run), "--set", "data.max_files=20",
                "--set", "training.batch_size=2", "--set", "logging.report_to=[]"], elsewhere, env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["nvfp4"]["quant_method"] == "hf_nvfp4"


def test_two_runs_in_one_process_log_into_their_own_directories(tmp_path):
    from hf_nvfp4.recipe import load_recipe
    from hf_nvfp4.train import run_recipe

    before = {k: os.environ.get(k) for k in ("TENSORBOARD_LOGGING_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    for name in ("a", "b"):
        recipe = load_recipe("tiny-cpu", ["training.max_steps=1", "training.batch_size=2", "data.max_files=10",
                                          f"output_dir={tmp_path / name}", "logging.report_to=[tensorboard]"])
        run_recipe(recipe, quiet=True)
        logs = list((tmp_path / name / "logs").rglob("events.out.tfevents*"))
        assert logs, f"run {name} wrote no TensorBoard events into its own logs dir"
    assert {k: os.environ.get(k) for k in before} == before


_PROBE = """
import resource, sys
from hf_nvfp4.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate', 'datasets'})
ru = resource.getrusage(resource.RUSAGE_SELF)
print('RESULT', code, ','.join(heavy) or '-', ru.ru_utime + ru.ru_stime, file=sys.stderr)
"""


@pytest.mark.parametrize("args,code", [(["--help"], 0), (["recipes"], 0), (["train"], 2), (["bogus"], 2),
                                       (["train", "--max-steps", "x"], 2)])
def test_help_recipes_and_argument_errors_import_no_torch(args, code):
    """Cheap help: no torch or transformers is imported (CPU time is printed, not asserted: a shared CI box)."""
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    result = out.stderr.strip().splitlines()[-1].split()
    assert result[0] == "RESULT", out.stderr
    assert int(result[1]) == code and result[2] == "-", (args, result)
    print(args, f"CPU {float(result[3]):.2f} s")


def test_import_registers_quant_method_once_transformers_models_load():
    """``import hf_nvfp4`` is lazy, yet from_pretrained knows quant_method "hf_nvfp4" (registered when
    transformers' model code loads, or at once if it already has)."""
    probe = ("import sys, hf_nvfp4; assert 'transformers' not in sys.modules; "
             "from transformers.modeling_utils import PreTrainedModel; "
             "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
             "print(M['hf_nvfp4'].__name__)")
    late = ("import transformers.modeling_utils, hf_nvfp4; "
            "from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING as M; "
            "print(M['hf_nvfp4'].__name__)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for code, name in ((probe, "NVFP4HfQuantizer"), (late, "NVFP4Config")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == name, out.stderr[-2000:]
