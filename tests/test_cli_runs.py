"""The CLI never destroys a run, and bad input fails early with one clear message (issue 11)."""

import json
import subprocess
import sys

import pytest

import hf_nvfp4.science.ablate as ablate_mod
from hf_nvfp4.cli import main
from hf_nvfp4.evaluation import compare_runs
from hf_nvfp4.recipe import RecipeError, load_recipe
from hf_nvfp4.rundir import RunDirError, checkpoint_problem, latest_complete_checkpoint, prepare_output_dir
from hf_nvfp4.train import format_summary

TINY = [
    "model.config.hidden_size=64",
    "model.config.intermediate_size=128",
    "model.config.num_hidden_layers=2",
    "data.seq_len=64",
    "data.max_files=10",
    "training.batch_size=2",
    "training.logging_steps=1",
    "training.warmup_steps=1",
    "training.save_steps=2",
    "logging.report_to=[]",
    "nvfp4.bf16_last_blocks=0",
]


def _train(out, *extra):
    cmd = [sys.executable, "-m", "hf_nvfp4.cli", "train", "tiny-cpu", "--output-dir", str(out), *extra]
    for o in TINY:
        cmd += ["--set", o]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=900)


def _steps_logged(out):
    return [h["step"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]


def test_train_refuses_resumes_and_overwrites(tmp_path):
    out = tmp_path / "run"
    res = _train(out, "--max-steps", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert "tensorboard --logdir" not in res.stdout and not (out / "logs").exists()  # report_to is empty
    weights = (out / "checkpoint-4" / "model.safetensors").read_bytes()

    # 1. the same command again refuses and touches nothing
    res = _train(out, "--max-steps", "4")
    assert res.returncode == 2
    assert "already holds a run" in res.stderr and "--resume" in res.stderr and "--overwrite" in res.stderr
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == weights

    # 2. a truncated newest checkpoint is named and skipped; training continues from checkpoint-2
    (out / "checkpoint-4" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    res = _train(out, "--max-steps", "4", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping" in res.stderr and "checkpoint-4: model.safetensors is truncated" in res.stderr
    assert "resuming from" in res.stderr and "checkpoint-2" in res.stderr
    assert _steps_logged(out) == [1, 2, 3, 4]  # steps 1-2 from the checkpoint's history, 3-4 trained now
    assert checkpoint_problem(out / "checkpoint-4") is None  # saved again, complete

    # 3. --overwrite starts over and removes the previous run's checkpoints
    res = _train(out, "--max-steps", "2", "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-2").is_dir()
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_resume_without_a_complete_checkpoint_is_an_error(tmp_path):
    ck = tmp_path / "checkpoint-3"
    ck.mkdir()
    (ck / "trainer_state.json").write_text('{"global_step": 3')  # cut off
    (ck / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (ck / "optimizer.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    assert latest_complete_checkpoint(tmp_path) == (
        None,
        [("checkpoint-3", "trainer_state.json is not valid JSON (truncated?)")],
    )
    with pytest.raises(RunDirError, match=r"--resume: no complete checkpoint.*checkpoint-3.*--overwrite"):
        prepare_output_dir(tmp_path, resume=True)
    (ck / "trainer_state.json").write_text('{"global_step": 3}')
    assert checkpoint_problem(ck) == "optimizer.pt is truncated or not a torch.save archive"
    with pytest.raises(RunDirError, match="exclude each other"):
        prepare_output_dir(tmp_path, resume=True, overwrite=True)
    assert prepare_output_dir(tmp_path / "new", resume=True) is None  # nothing there: a new run


def test_train_without_a_recipe_prints_usage(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: hf-nvfp4 train") and "give a recipe" in err and "hf-nvfp4 recipes" in err


def _fake_run(recipe):
    return {"final_loss": 2.0, "eval_loss": 2.0, "loss_curve": [[1, 2.0]], "tokens": 64, "seconds": 0.0}


def test_ablate_writes_under_runs_and_never_overwrites_unasked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ablate_mod, "run_one", _fake_run)
    monkeypatch.setattr(ablate_mod, "plot", lambda *a, **k: [])
    ablate_mod.ablate("ablation-cpu", seeds=[0], variants=["bf16", "fp8"])
    results = tmp_path / "runs" / "ablate" / "ablation-cpu" / "results"
    assert (results / "runs.jsonl").is_file() and (results / "ablation.md").is_file()
    assert not (tmp_path / "docs").exists()
    with pytest.raises(RunDirError, match=r"already holds ablation results.*--resume.*--overwrite"):
        ablate_mod.ablate("ablation-cpu", seeds=[0, 1], variants=["bf16", "fp8"])
    ablate_mod.ablate("ablation-cpu", seeds=[0, 1], variants=["bf16", "fp8"], resume=True)
    assert len((results / "runs.jsonl").read_text().splitlines()) == 4
    ablate_mod.ablate("ablation-cpu", seeds=[2], variants=["bf16"], overwrite=True)
    rows = [json.loads(x) for x in (results / "runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("bf16", 2)]
    assert main(["ablate", "ablation-cpu", "--seeds", "0", "--variants", "bf16"]) == 2  # the CLI: exit 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.dtype=float17", r"recipe.model.dtype must be one of float32, bfloat16, float16.*'float17'"),
        ("precision_switch.at=1.5", r"recipe.precision_switch: .*fraction.*\(0, 1\)"),
        ("precision_switch.at=abc", r"recipe.precision_switch: cannot read 'abc' as a token count"),
        ("precision_switch.to=fp17", r"recipe.precision_switch sets to/scope but not at"),
        ("precision_switch.scope=forward", r"recipe.precision_switch sets to/scope but not at"),
        ("fp8_shadow.enabled=true", None),  # valid
        ("fp8_shadow.format=fp9", r"recipe.fp8_shadow: FP8ShadowCallback: format must be one of"),  # even while off
    ],
)
def test_recipe_values_are_checked_at_load(override, message):
    if message is None:
        load_recipe("tiny-cpu", [override])
    else:
        with pytest.raises(RecipeError, match=message):
            load_recipe("tiny-cpu", [override])


def test_callback_sections_and_yaml_tags_fail_at_load(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe.fp8_shadow: FP8ShadowCallback: format must be one of"):
        load_recipe("tiny-cpu", ["fp8_shadow.enabled=true", "fp8_shadow.format=fp9"])
    with pytest.raises(RecipeError, match=r"recipe.fp8_shadow: .*reference file .*nope.json.* does not exist"):
        load_recipe(
            "tiny-cpu",
            ["fp8_shadow.enabled=true", "fp8_shadow.mode=reference", f"fp8_shadow.reference={tmp_path}/nope.json"],
        )
    with pytest.raises(RecipeError, match=r"recipe.precision_switch: PrecisionSwitchCallback: to must be one of"):
        load_recipe("tiny-cpu", ["precision_switch.at=0.8", "precision_switch.to=fp17"])
    with pytest.raises(RecipeError, match=r"precision_switch needs an nvfp4 section"):
        load_recipe("tiny-cpu", ["nvfp4=null", "precision_switch.at=0.8"])
    with pytest.raises(
        RecipeError, match=r"override 'training.seed=!!python/object/apply:os.system \[ls\]'.*not plain YAML"
    ):
        load_recipe("tiny-cpu", ["training.seed=!!python/object/apply:os.system [ls]"])


def test_cli_reports_recipe_errors_in_one_line(capsys, tmp_path):
    assert (
        main(["train", "tiny-cpu", "--set", "training.seed=!!python/name:os.system", "--output-dir", str(tmp_path)])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-nvfp4: recipe error: override") and "\n" not in err and "Traceback" not in err


def test_compare_names_a_file_that_is_not_json(tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.txt.* is not an hf-nvfp4 eval JSON \(JSONDecodeError"):
        compare_runs([str(bad)])
    assert main(["compare", str(bad)]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_plot_parity_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["plot-parity", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hf-nvfp4 plot-parity: needs matplotlib: pip install 'hf-nvfp4[plots]'"


def test_summary_names_no_tensorboard_dir_when_none_was_written():
    s = {
        "recipe": "r",
        "steps": 1,
        "world_size": 1,
        "first_loss": 2.0,
        "final_loss": 1.0,
        "tokens_per_s": 1.0,
        "tokens": 1,
        "seconds": 1.0,
        "checkpoint": "/x",
        "logs": None,
    }
    text = format_summary(s)
    assert "tensorboard" not in text and "none written (logging.report_to is empty)" in text
