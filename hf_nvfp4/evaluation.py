"""Evaluate saved checkpoints and compare runs side by side (the ``eval`` and ``compare`` commands)."""

from __future__ import annotations

import json
from pathlib import Path

METRIC_DIR = Path(__file__).resolve().parent / "metrics" / "relative_gap"


def evaluate_checkpoint(
    model_dir: str,
    tasks,
    *,
    include_path=None,
    limit=None,
    num_fewshot=None,
    batch_size: int = 8,
    precision: str | None = None,
    out: str | None = None,
) -> dict:
    """Load a saved (NVFP4) checkpoint with the plugin imported, run lm-eval, write JSON, return a summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

    from .integrations.lm_eval import evaluate_lm, headline_metrics

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir!r} is not a saved model directory (no config.json)")
    from .rundir import check_model_weights

    check_model_weights(path, "eval")
    model = AutoModelForCausalLM.from_pretrained(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tok = ByT5Tokenizer()
    model.eval()
    with torch.no_grad():
        res = evaluate_lm(
            model,
            tok,
            tasks,
            include_path=include_path,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            precision=precision,
        )
    summary = {
        "model": str(path.resolve()),
        "precision": precision or "as trained",
        "metrics": {k.split("/", 1)[1]: v for k, v in headline_metrics(res).items()},
        "results": res.get("results", {}),
        "config": {k: str(v) for k, v in res.get("config", {}).items()},
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2, default=str))
    return summary


def format_table(rows: dict[str, dict[str, float]], baseline: str | None = None) -> str:
    """Markdown table: one row per task/metric, one column per run (+ relative gap to the baseline)."""
    names = list(rows)
    metrics = sorted({m for r in rows.values() for m in r})
    head = ["task/metric", *names]
    gap_cols = [n for n in names if baseline and n != baseline]
    head += [f"{n} vs {baseline}" for n in gap_cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gaps = relative_gaps(rows, baseline) if baseline else {}
    for m in metrics:
        cells = [m] + [_number(rows[n][m]) if m in rows[n] else "-" for n in names]
        cells += [
            f"{gaps[n][m]:+.2%}" if gaps.get(n, {}).get(m, float("nan")) == gaps.get(n, {}).get(m) else "-"
            for n in gap_cols
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(v: float) -> str:
    """4 decimals for scores and losses; 4 significant digits where that would be unreadable (1.327e+13)."""
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.4g}"


def relative_gaps(rows: dict[str, dict[str, float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per run and metric, (run - baseline) / |baseline|, through the offline ``evaluate`` metric module."""
    import evaluate

    if baseline not in rows:
        raise ValueError(f"baseline {baseline!r} is not one of the runs {list(rows)}")
    metric = evaluate.load(str(METRIC_DIR))
    out = {}
    for name, r in rows.items():
        if name == baseline:
            continue
        common = [m for m in r if m in rows[baseline]]
        if not common:
            continue
        res = metric.compute(predictions=[r[m] for m in common], references=[rows[baseline][m] for m in common])
        out[name] = dict(zip(common, res["relative_gaps"], strict=True))
    return out


def compare_runs(files: list[str], names: list[str] | None = None, baseline: str | None = None) -> str:
    """A table like the paper's Table 2 from ``hf-nvfp4 eval`` JSON files."""
    if names and len(names) != len(files):
        raise ValueError(f"--names gives {len(names)} names for {len(files)} files")
    rows = {}
    for i, f in enumerate(files):
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"no evaluation file {f!r} (write one with: hf-nvfp4 eval MODEL_DIR --out FILE)")
        try:
            data = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(
                f"{f!r} is not an hf-nvfp4 eval JSON ({type(exc).__name__}: {exc}); "
                "write one with: hf-nvfp4 eval MODEL_DIR --out FILE"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            raise ValueError(f"{f!r} is not an hf-nvfp4 eval JSON (no 'metrics')")
        rows[names[i] if names else p.stem] = data["metrics"]
    return format_table(rows, baseline or (next(iter(rows)) if len(rows) > 1 else None))
