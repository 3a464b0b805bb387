"""The paper's ablations at small scale: one command, paired seeds, a table and plots.

    hf-nvfp4 ablate [RECIPE] [--seeds 0,1,2] [--variants ...] [--out DIR] [--resume | --overwrite]

Every variant of a seed starts from the same initial weights and sees the same batches, so
differences between variants are paired. Finished runs are kept in ``runs.jsonl``; rerunning
the command with ``--resume`` continues the sweep where it stopped (or adds seeds/variants).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

from .config import NVFP4Config
from .ops.recipe import NVFP4Recipe
from .recipe import PrecisionSwitchSection, Recipe, load_recipe

# name -> (description, how to change the recipe)
VARIANTS: dict[str, str] = {
    "bf16": "BF16 everywhere",
    "fp8": "FP8 baseline (E4M3, 1x128 / 128x128 blocks; first block and last 2 in BF16)",
    "nvfp4": "NVFP4, full recipe",
    "no_rht": "NVFP4 without RHT",
    "no_sr": "NVFP4 without stochastic rounding",
    "no_2d": "NVFP4 without 2D weight scaling",
    "all_nvfp4": "NVFP4 in every block (no BF16 blocks)",
    "mxfp4": "MXFP4 (1x32 blocks, UE8M0 scales), same recipe otherwise",
    "switch_all": "NVFP4, all GEMMs to BF16 for the last 18% of steps",
    "switch_fwd": "NVFP4, Fprop to BF16 for the last 18% of steps",
}
SWITCH_AT = 0.82


RESULT_FILES = ("runs.jsonl", "ablation.md", "ablation.json", "ablation_loss_curves.png", "ablation_relative_gap.png")


def _protect(out: Path, resume: bool, overwrite: bool) -> None:
    """Never add to or overwrite a previous sweep's results unasked."""
    from .rundir import RunDirError

    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other; pick one")
    if not (out / "runs.jsonl").exists() or resume:
        return
    if overwrite:
        for name in RESULT_FILES:
            (out / name).unlink(missing_ok=True)
        print(f"hf-nvfp4 ablate: --overwrite: removed the previous results in {out}", flush=True)
        return
    raise RunDirError(
        f"{out} already holds ablation results (runs.jsonl); pass --resume to add the missing runs to them, "
        "--overwrite to delete them and start over, or choose another --out"
    )


def variant_recipe(base: Recipe, variant: str, seed: int, runs_dir: Path) -> Recipe:
    cfg = base.nvfp4 or NVFP4Config()
    nv = {
        "bf16": None,
        "fp8": NVFP4Config.from_recipe(
            NVFP4Recipe.for_format("fp8_block", bf16_first_blocks=1, bf16_last_blocks=2, seed=cfg.seed)
        ),
        "nvfp4": cfg,
        "no_rht": replace(cfg, disable_rht=True),
        "no_sr": replace(cfg, disable_stochastic_rounding=True),
        "no_2d": replace(cfg, disable_2d_quantization=True),
        "all_nvfp4": replace(cfg, bf16_first_blocks=0, bf16_last_blocks=0),
        "mxfp4": replace(cfg, format="mxfp4"),
        "switch_all": cfg,
        "switch_fwd": cfg,
    }[variant]
    if nv is not None:
        nv = replace(nv, seed=seed, backend="emulated")
    switch = PrecisionSwitchSection()
    if variant.startswith("switch_"):
        switch = PrecisionSwitchSection(at=SWITCH_AT, to="bf16", scope="all" if variant == "switch_all" else "forward")
    training = replace(base.training, seed=seed, save_steps=0, eval_steps=0)
    return replace(
        base,
        name=f"{base.name}-{variant}-s{seed}",
        output_dir=str(runs_dir / f"{variant}-s{seed}"),
        nvfp4=nv,
        precision_switch=switch,
        training=training,
        logging=replace(base.logging, report_to=[]),
    )


def run_one(recipe: Recipe) -> dict:
    from .train import run_recipe

    summary = run_recipe(recipe, evaluate_at_end=True, quiet=True)
    return {k: summary[k] for k in ("final_loss", "eval_loss", "loss_curve", "tokens", "seconds")}


def _stats(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: eval loss mean/std over seeds, paired relative gaps to FP8 and BF16."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    table = []
    for v in variants:
        losses = [by[(v, s)]["eval_loss"] for s in seeds if (v, s) in by]
        if not losses:
            continue
        row = {"variant": v, "description": VARIANTS[v], "n": len(losses)}
        row["eval_loss"], row["eval_loss_std"] = _stats(losses)
        for ref in ("fp8", "bf16"):
            gaps = [
                (by[(v, s)]["eval_loss"] - by[(ref, s)]["eval_loss"]) / by[(ref, s)]["eval_loss"]
                for s in seeds
                if (v, s) in by and (ref, s) in by
            ]
            mean, std = _stats(gaps) if gaps else (float("nan"), float("nan"))
            row[f"gap_vs_{ref}"], row[f"gap_vs_{ref}_std"] = mean, std
            # a paired difference is "resolved" when its mean exceeds 2 standard errors
            row[f"gap_vs_{ref}_resolved"] = bool(len(gaps) > 1 and abs(mean) > 2 * std / math.sqrt(len(gaps)))
        table.append(row)
    return table


def _gap_cell(r: dict, ref: str) -> str:
    if r["variant"] == ref:
        return "(reference)"
    m, s = r[f"gap_vs_{ref}"], r[f"gap_vs_{ref}_std"]
    if m != m:  # NaN: no reference run
        return "-"
    mark = "" if r[f"gap_vs_{ref}_resolved"] else " (within noise)"
    return f"{100 * m:+.2f}% ± {100 * s:.2f}%{mark}" if s == s else f"{100 * m:+.2f}%"


def markdown_table(table: list[dict]) -> str:
    lines = ["| variant | eval loss (mean ± sd) | gap vs FP8 | gap vs BF16 | seeds |", "|---|---|---|---|---|"]
    for r in table:
        sd = f" ± {r['eval_loss_std']:.4f}" if r["eval_loss_std"] == r["eval_loss_std"] else ""
        lines.append(
            f"| {r['description']} | {r['eval_loss']:.4f}{sd} | {_gap_cell(r, 'fp8')} | "
            f"{_gap_cell(r, 'bf16')} | {r['n']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], variants: list[str], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    by = {(r["variant"], r["seed"]): r for r in rows}

    def mean_curve(v):
        curves = [by[(v, s)]["loss_curve"] for s in seeds if (v, s) in by]
        if not curves:
            return None
        n = min(len(c) for c in curves)
        steps = [c[0] for c in curves[0][:n]]
        return steps, [statistics.fmean(c[i][1] for c in curves) for i in range(n)], by[(v, seeds[0])]

    color = {v: f"C{i % 10}" for i, v in enumerate(VARIANTS)}  # one colour per variant in every panel
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for v in variants:
        mc = mean_curve(v)
        if mc:
            steps, loss, r = mc
            tok = [s * r["tokens"] / r["loss_curve"][-1][0] / 1e6 for s in steps]
            ax.plot(tok, loss, label=v, color=color[v], linestyle="--" if v in ("bf16", "fp8") else "-")
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel(f"training loss (mean of {len(seeds)} seeds)")
    ax.set_title(title)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / "ablation_loss_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, ref in zip(axes, ("fp8", "bf16"), strict=True):
        ref_curve = mean_curve(ref)
        if not ref_curve:
            continue
        for v in variants:
            mc = mean_curve(v)
            if not mc or v == ref:
                continue
            steps, loss, r = mc
            n = min(len(loss), len(ref_curve[1]))
            tok = [s * r["tokens"] / r["loss_curve"][-1][0] / 1e6 for s in steps[:n]]
            gap = [100 * (a - b) / b for a, b in zip(loss[:n], ref_curve[1][:n], strict=True)]
            ax.plot(tok, gap, label=v, color=color[v], linestyle=":" if v in ("bf16", "fp8") else "-")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"relative loss gap vs {ref.upper()}")
        ax.set_xlabel("tokens (M)")
    axes[0].set_ylabel("(training loss - ref) / ref [%], seed mean")
    fig.tight_layout()
    paths.append(out_dir / "ablation_relative_gap.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def ablate(
    recipe_name: str = "ablation-cpu",
    seeds=(0, 1, 2),
    variants=None,
    out_dir=None,
    overrides=None,
    command: str | None = None,
    runs_dir: str | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Run the sweep; writes runs.jsonl, ablation.md/json and the plots into ``out_dir``.

    out_dir defaults to ``runs/ablate/<recipe>/results``; each run's checkpoint goes to
    ``runs_dir`` (default ``runs/ablate/<recipe>``). An ``out_dir`` that already holds a sweep
    (runs.jsonl) is an error unless ``resume`` (add the missing runs to it) or ``overwrite``
    (delete its results and start over).
    """
    from tqdm.auto import tqdm

    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if len(seeds) < 1:
        raise ValueError("give at least one seed")
    base = load_recipe(recipe_name, overrides)
    out_dir = out_dir or str(Path("runs") / "ablate" / base.name / "results")
    out = Path(out_dir)
    log = out / "runs.jsonl"
    _protect(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            done[(r["variant"], r["seed"])] = r
    todo = [(v, s) for s in seeds for v in variants if (v, s) not in done]
    if done:
        print(f"hf-nvfp4 ablate: resuming, {len(done)} run(s) already in {log}, {len(todo)} to go", flush=True)
    bar = tqdm(todo, desc="ablation", unit="run")
    for v, s in bar:
        bar.set_postfix_str(f"{v} seed {s}")
        t0 = time.perf_counter()
        res = run_one(variant_recipe(base, v, s, Path(runs_dir or Path("runs") / "ablate" / base.name)))
        row = {"variant": v, "seed": s, **res, "wall": time.perf_counter() - t0}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(v, s)] = row
        tqdm.write(f"  {v:10s} seed {s}: eval loss {res['eval_loss']:.4f} ({row['wall']:.0f} s)")
    rows = [done[k] for k in done if k[0] in variants and k[1] in seeds]
    table = summarize(rows, variants)
    (out / "ablation.json").write_text(json.dumps(table, indent=2))
    tokens = rows[0]["tokens"] if rows else 0
    title = f"{base.name}: {len(seeds)} seeds, {tokens / 1e6:.2f}M tokens per run"
    pngs = plot(rows, variants, out, title)
    cmd = command or f"hf-nvfp4 ablate {recipe_name} --seeds {','.join(map(str, seeds))} --out {out_dir}"
    md = [
        f"# Ablation results ({base.name})",
        "",
        "Made with:",
        "",
        "```bash",
        cmd,
        "```",
        "",
        f"{title}. Eval loss is the loss on a held-out {base.data.eval_fraction:.0%} of the packed data after the "
        "last step; gaps are paired per seed: (variant - reference) / reference, mean ± sd over seeds. "
        "'(within noise)' marks a mean gap smaller than two standard errors of the paired differences: "
        "no direction is claimed for those.",
        "",
        markdown_table(table),
        "",
        *[f"![{p.stem}]({p.name})" for p in pngs],
        "",
    ]
    (out / "ablation.md").write_text("\n".join(md))
    print("\n" + markdown_table(table), flush=True)
    print(
        f"hf-nvfp4 ablate: wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {', '.join(p.name for p in pngs)}"
    )
    return table
