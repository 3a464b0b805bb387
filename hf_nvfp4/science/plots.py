"""Plots of a run's loss against its shadow (matplotlib, an optional dependency)."""

from __future__ import annotations

import json
from pathlib import Path


def _history(run: str | Path) -> list[dict]:
    p = Path(run)
    if p.is_dir():
        p = p / "trainer_state.json"
    if not p.is_file():
        raise FileNotFoundError(f"no trainer_state.json at {p}; pass a run directory or the file itself")
    return json.loads(p.read_text())["log_history"]


def plot_loss_parity(run: str | Path, out: str | Path, tag: str = "fp8", title: str | None = None) -> Path:
    """Two panels: NVFP4 loss vs its shadow, and the relative gap (raw and smoothed) over steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'hf-nvfp4[plots]'") from exc
    hist = _history(run)
    loss = [(h["step"], h["loss"]) for h in hist if "loss" in h]
    shadow = [(h["step"], h[f"shadow_{tag}_loss"]) for h in hist if f"shadow_{tag}_loss" in h]
    gap = [
        (h["step"], 100 * h[f"loss_gap_vs_{tag}"], 100 * h[f"loss_gap_vs_{tag}_smoothed"])
        for h in hist
        if f"loss_gap_vs_{tag}" in h
    ]
    if not shadow:
        raise ValueError(f"{run}: no shadow_{tag}_loss in the log history; train with the {tag.upper()} shadow on")
    switch = [h["precision_switch_step"] for h in hist if "precision_switch_step" in h]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    a.plot(*zip(*loss, strict=True), label="NVFP4 (full recipe)")
    a.plot(*zip(*shadow, strict=True), label=f"{tag.upper()} shadow (lockstep)", linestyle="--")
    a.set_ylabel("training loss")
    a.legend()
    a.set_title(title or f"Loss parity: NVFP4 vs its {tag.upper()} shadow")
    steps, raw, smooth = zip(*gap, strict=True)
    b.axhline(0, color="gray", linewidth=0.8)
    b.plot(steps, raw, alpha=0.4, label="relative gap")
    b.plot(steps, smooth, label="smoothed (EMA 0.9)")
    b.set_ylabel(f"(loss - {tag}) / {tag}  [%]")
    b.set_xlabel("step")
    for s in switch:
        for ax in (a, b):
            ax.axvline(s, color="red", linestyle=":", linewidth=1)
    b.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
