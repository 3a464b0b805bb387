"""The ablation command at a tiny size: runs, resumes, writes the table and the plots."""

import json
import subprocess
import sys

from hf_nvfp4.science.ablate import summarize

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


def _run(out, seeds, variants, *extra):
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


def test_ablate_runs_resumes_grows_and_writes(tmp_path):
    _run(tmp_path, "0", "bf16,nvfp4")
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {r["variant"] for r in rows} == {"bf16", "nvfp4"}
    assert all(r["fingerprint"] and r["eval_loss_bf16"] > 0 for r in rows)
    # paired: every variant of a seed starts from the same weights, so step-0 losses agree closely
    first = [r["loss_curve"][0][1] for r in rows]
    assert max(first) - min(first) < 0.05 * min(first)
    res = _run(tmp_path, "0,1", "nvfp4", "--resume")  # grow a finished sweep by a seed
    assert "resuming: 1 run(s) reused" in res.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    md = (tmp_path / "ablation.md").read_text()
    assert "hf-nvfp4 ablate" in md and "`nvfp4`: NVFP4, full recipe" in md and "vs FP8" in md
    for png in ("ablation_loss_curves.png", "ablation_relative_gap.png", "ablation_paired_ci.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    table = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["variant"] for r in table] == ["nvfp4"] and table[0]["n"] == 2


def test_summary_pairs_by_seed_and_resolves_only_with_a_t_interval():
    data = [("fp8", 2.0, 2.0, 2.0), ("bf16", 2.0, 2.0, 2.0), ("nvfp4", 2.2, 2.21, 2.19), ("no_sr", 1.8, 2.2, 2.0),
            ("no_rht", 2.17, 2.19, 2.16)]
    rows = [{"variant": v, "seed": s, "eval_loss": loss, "eval_loss_bf16": loss, "bf16_blocks": "0+1 of 4"}
            for v, *losses in data for s, loss in enumerate(losses)]
    t = {r["variant"]: r for r in summarize(rows, ["fp8", "bf16", "nvfp4", "no_sr", "no_rht"])}
    assert t["nvfp4"]["vs_fp8"]["resolved"] and abs(t["nvfp4"]["vs_fp8"]["mean"] - 0.1) < 1e-9
    assert t["nvfp4"]["vs_fp8"]["n"] == 3 and t["nvfp4"]["vs_nvfp4"] is None
    assert not t["no_sr"]["vs_fp8"]["resolved"]
    # no_rht vs the full recipe: -1.3%, -0.9%, -1.4% paired by seed -> resolved (the seed spread is not)
    s = t["no_rht"]["vs_nvfp4"]
    assert s["resolved"] and s["hi"] < 0 and s["n_lower"] == 3
    assert t["no_rht"]["vs_bf16"]["resolved"] and t["no_rht"]["vs_bf16"]["lo"] > 0
