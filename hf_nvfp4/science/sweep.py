"""The loss sweep's tests re-checked under one multiple-comparison correction.

``python -m hf_nvfp4.science.sweep docs/results`` reads ``ablation.json`` (written by
``hf-nvfp4 ablate``), turns each paired comparison (mean, sd and n over seeds) into a
two-sided one-sample t-test, corrects the 42 loss comparisons and the 28 BF16-evaluation tests
together (Holm, or ``--correction bh``) and writes ``sweep_corrected.csv`` and
``sweep_corrected.md`` beside it. Replication unit: the training seed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

from scipy import stats

from .multiple import correct

COMPARISONS = (
    ("vs_nvfp4", "loss vs NVFP4 full recipe"),
    ("vs_fp8", "loss vs FP8"),
    ("vs_bf16", "loss vs BF16"),
    ("bf16_eval_vs_own", "BF16 forward vs as trained"),
    ("bf16_eval_vs_bf16", "BF16 forward vs the BF16-trained model"),
)


def _test(s: dict, level: float = 0.95) -> dict:
    n, mean, sd = s["n"], s["mean"], s["sd"]
    if n < 2 or sd == 0:
        return {"n": n, "mean": mean, "sd": sd, "lo": s.get("lo"), "hi": s.get("hi"), "p": float("nan")}
    se = sd / math.sqrt(n)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "lo": s["lo"],
        "hi": s["hi"],
        "p": float(2 * stats.t.sf(abs(mean) / se, n - 1)),
    }


def corrected(table: list[dict], method: str = "holm") -> tuple[list[dict], int]:
    """One row per comparison with its p-value, adjusted across all of them; and the family size."""
    loss, bf16 = [], []
    for v in table:
        for key, what in COMPARISONS:
            s = v.get(key)
            if not s:
                continue
            if key.startswith("bf16_eval") and v["variant"] == "bf16":
                continue  # nothing converted: not a test
            row = {"variant": v["variant"], "comparison": what, "unit": f"training seed (n={s['n']})", **_test(s)}
            (bf16 if key.startswith("bf16_eval") else loss).append(row)
    tables = [{"rows": loss}, {"rows": bf16}]
    m = correct(tables, method)
    return loss + bf16, m


def markdown(rows: list[dict], m: int, method: str) -> str:
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg"}[method]
    n_loss = sum(not r["comparison"].startswith("BF16 forward") for r in rows)
    out = [
        f"{m} tests corrected together ({name}): {n_loss} loss comparisons and {len(rows) - n_loss} "
        "BF16-evaluation comparisons, of which those with sd = 0 over seeds (nothing to test) carry no p-value. "
        "Replication unit: the training seed (n = 3 per comparison). Relative gaps in %.",
        "",
        "| variant | comparison | mean [95% CI] (%) | n | p | p adj. | resolved |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = "-" if r["p"] != r["p"] else f"{r['p']:.4f}"
        pa = "-" if r["p_adj"] is None else f"{r['p_adj']:.3f}"
        res = "-" if r["resolved"] is None else "yes" if r["resolved"] else "no"
        out.append(
            f"| `{r['variant']}` | {r['comparison']} | {100 * r['mean']:+.2f} [{100 * r['lo']:+.2f}, "
            f"{100 * r['hi']:+.2f}] | {r['n']} | {p} | {pa} | {res} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hf_nvfp4.science.sweep")
    ap.add_argument("results_dir")
    ap.add_argument("--correction", choices=["holm", "bh"], default="holm")
    a = ap.parse_args(argv)
    d = Path(a.results_dir)
    rows, m = corrected(json.loads((d / "ablation.json").read_text()), a.correction)
    with (d / "sweep_corrected.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (d / "sweep_corrected.md").write_text(markdown(rows, m, a.correction))
    print(
        f"{m} tests; resolved after {a.correction}: {[(r['variant'], r['comparison']) for r in rows if r['resolved']]}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
