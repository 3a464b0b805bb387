"""Plots of an ablation sweep: loss curves, gap curves, and the paired 95% intervals."""

from __future__ import annotations

import statistics
from pathlib import Path


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'hf-nvfp4[plots]'") from exc
    return plt


def _mean_curve(by, seeds, v):
    curves = [by[(v, s)]["loss_curve"] for s in seeds if (v, s) in by]
    if not curves:
        return None
    n = min(len(c) for c in curves)
    r = next(by[(v, s)] for s in seeds if (v, s) in by)
    tok = [c[0] * r["tokens"] / r["loss_curve"][-1][0] / 1e6 for c in curves[0][:n]]
    return tok, [statistics.fmean(c[i][1] for c in curves) for i in range(n)]


def plot(rows: list[dict], table: list[dict], variants: list[str], out_dir: Path, title: str,
         references: tuple[str, ...] = ("nvfp4", "fp8", "bf16"), all_variants: list[str] | None = None) -> list[Path]:
    """ablation_loss_curves.png, ablation_relative_gap.png and ablation_paired_ci.png in ``out_dir``.

    references: the variants gaps are taken against; all_variants: every variant name, in the
    order that fixes each one's colour across plots.
    """
    REFERENCES, VARIANTS = references, all_variants or variants  # noqa: N806
    plt = _plt()
    seeds = sorted({r["seed"] for r in rows})
    by = {(r["variant"], r["seed"]): r for r in rows}
    color = {v: f"C{i % 10}" for i, v in enumerate(VARIANTS)}
    style = {v: "--" if v in ("bf16", "fp8", "fp8_nvfp4_alloc") else ":" if i >= 10 else "-"
             for i, v in enumerate(VARIANTS)}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for v in variants:
        mc = _mean_curve(by, seeds, v)
        if mc:
            ax.plot(*mc, label=v, color=color[v], linestyle=style[v])
    ax.set(xlabel="tokens (M)", ylabel=f"training loss (mean of {len(seeds)} seeds)", title=title)
    ax.legend(ncol=2, fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "ablation_loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(REFERENCES), figsize=(16, 4.5), sharey=True)
    for ax, ref in zip(axes, REFERENCES, strict=True):
        rc = _mean_curve(by, seeds, ref)
        if not rc:
            continue
        for v in variants:
            mc = _mean_curve(by, seeds, v)
            if not mc or v == ref:
                continue
            n = min(len(mc[1]), len(rc[1]))
            gap = [100 * (a - b) / b for a, b in zip(mc[1][:n], rc[1][:n], strict=True)]
            ax.plot(mc[0][:n], gap, label=v, color=color[v], linestyle=style[v])
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.legend(fontsize=6, ncol=2)
        ax.set(title=f"training-loss gap vs {ref} (seed mean)", xlabel="tokens (M)")
    axes[0].set_ylabel("(loss - ref) / ref [%]")
    fig.tight_layout()
    paths.append(out_dir / "ablation_relative_gap.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(REFERENCES), figsize=(16, 0.45 * len(table) + 1.5), sharey=True)
    names = [r["variant"] for r in table]
    for ax, ref in zip(axes, REFERENCES, strict=True):
        for i, r in enumerate(table):
            s = r.get(f"vs_{ref}")
            if not s or s["n"] == 0:
                continue
            lo, hi = s["lo"], s["hi"]
            c = "C3" if s["resolved"] else "gray"
            if lo == lo:
                ax.plot([100 * lo, 100 * hi], [i, i], color=c, linewidth=2)
            ax.plot(100 * s["mean"], i, "o", color=c)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set(title=f"eval-loss gap vs {ref}: mean, t 95% CI", xlabel="%")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title} (red: interval excludes 0)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "ablation_paired_ci.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
