"""The ablation command at a tiny size: runs, resumes, writes the table and the plots."""

import json
import subprocess
import sys

from hf_nvfp4.ablate import summarize

TINY = [
    "training.max_steps=4",
    "training.logging_steps=2",
    "training.warmup_steps=1",
    "data.max_files=10",
    "data.seq_len=64",
    "model.config.hidden_size=32",
    "model.config.intermediate_size=64",
    "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=1",
]


def _run(out, seeds, variants="bf16,fp8,nvfp4,switch_fwd", *extra):
    cmd = [
        sys.executable,
        "-m",
        "hf_nvfp4.cli",
        "ablate",
        "ablation-cpu",
        "--seeds",
        seeds,
        "--variants",
        variants,
        "--out",
        str(out),
        "--runs-dir",
        str(out.parent / "ckpts"),
        *extra,
    ]
    for o in TINY:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def test_ablate_runs_resumes_and_writes(tmp_path):
    res = _run(tmp_path, "0,1")
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and {r["variant"] for r in rows} == {"bf16", "fp8", "nvfp4", "switch_fwd"}
    # paired: every variant of a seed starts from the same weights, so step-0 losses agree closely
    for s in (0, 1):
        first = [r["loss_curve"][0][1] for r in rows if r["seed"] == s]
        assert max(first) - min(first) < 0.05 * min(first)
    res = _run(tmp_path, "0,1,2", "bf16,fp8,nvfp4,switch_fwd", "--resume")
    assert "resuming, 8 run(s) already" in res.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    md = (tmp_path / "ablation.md").read_text()
    assert "hf-nvfp4 ablate" in md and "| NVFP4, full recipe |" in md and "gap vs FP8" in md
    for png in ("ablation_loss_curves.png", "ablation_relative_gap.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    table = json.loads((tmp_path / "ablation.json").read_text())
    assert {r["variant"] for r in table} == {"bf16", "fp8", "nvfp4", "switch_fwd"} and all(r["n"] == 3 for r in table)


def test_summary_marks_gaps_within_noise():
    rows = [
        {"variant": v, "seed": s, "eval_loss": loss}
        for (v, s, loss) in [
            ("fp8", 0, 2.0),
            ("fp8", 1, 2.0),
            ("fp8", 2, 2.0),
            ("bf16", 0, 2.0),
            ("bf16", 1, 2.0),
            ("bf16", 2, 2.0),
            ("nvfp4", 0, 2.2),
            ("nvfp4", 1, 2.21),
            ("nvfp4", 2, 2.19),  # clearly worse
            ("no_sr", 0, 1.8),
            ("no_sr", 1, 2.2),
            ("no_sr", 2, 2.0),
        ]
    ]  # noise
    t = {r["variant"]: r for r in summarize(rows, ["fp8", "bf16", "nvfp4", "no_sr"])}
    assert t["nvfp4"]["gap_vs_fp8_resolved"] and abs(t["nvfp4"]["gap_vs_fp8"] - 0.1) < 1e-9
    assert not t["no_sr"]["gap_vs_fp8_resolved"]
