"""The paper's ablations at small scale: one command, paired seeds, t-intervals, a table and plots.

    hf-nvfp4 ablate [RECIPE] [--seeds 0,1,2] [--variants ...] [--out DIR] [--resume | --overwrite]

Every variant of a seed starts from the same initial weights and sees the same batches, so
differences between variants are paired by seed. Each variant is compared with the full NVFP4
recipe, the FP8 baseline and BF16: mean, sd and a Student-t 95% interval of the paired relative
gaps; an effect is "resolved" only when its interval excludes 0. Finished runs are kept in
``runs.jsonl`` with a fingerprint of their configuration: ``--resume`` continues the sweep, a
larger ``--seeds`` grows it, and a run made under another definition of its variant is run again.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import GEMMS, PAPER_STOCHASTIC_ROLES, fp8_baseline, mxfp4_paper
from ..generated import write_generated
from ..integrations.config import NVFP4Config
from ..recipe import PrecisionSwitchSection, RunSpec, load_recipe
from .ablate_plots import plot
from .stats import format_interval, paired_summary

SWITCH_AT = 0.82
_NO_BF16_BLOCKS = {"bf16_first_blocks": 0, "bf16_last_blocks": 0}


@dataclass(frozen=True)
class Variant:
    """One ablation variant: the recipe it trains with, and its late switch.

    recipe: "nvfp4" (the full recipe with ``changes``), "fp8" / "fp8_nvfp4_alloc" (the FP8
        baseline, the paper's BF16 share or the NVFP4 recipe's blocks), "mxfp4" or "bf16" (none).
    switch: the scope of a late switch to BF16 at ``SWITCH_AT`` of the steps, or None.
    """

    description: str
    recipe: str = "nvfp4"
    changes: dict = field(default_factory=dict)
    switch: str | None = None


VARIANTS: dict[str, Variant] = {
    "bf16": Variant("BF16 everywhere", "bf16"),
    "fp8": Variant("FP8 baseline (E4M3, 1x128 / 128x128 blocks; the paper's 1 + 2 of 62 blocks in BF16, as a share)",
                   "fp8"),
    "fp8_nvfp4_alloc": Variant("FP8 with the NVFP4 recipe's BF16 blocks (format alone differs)", "fp8_nvfp4_alloc"),
    "nvfp4": Variant("NVFP4, full recipe"),
    "base": Variant("NVFP4 base method: no RHT, no SR, no 2D, no BF16 blocks (App. E.1)",
                    changes=dict(disable_rht=True, disable_stochastic_rounding=True, disable_2d_quantization=True,
                                 **_NO_BF16_BLOCKS)),
    "no_rht": Variant("NVFP4 without RHT", changes=dict(disable_rht=True)),
    "no_sr": Variant("NVFP4 without stochastic rounding", changes=dict(disable_stochastic_rounding=True)),
    "no_2d": Variant("NVFP4 without 2D weight scaling", changes=dict(disable_2d_quantization=True)),
    "all_nvfp4": Variant("NVFP4 in every block (no BF16 blocks)", changes=_NO_BF16_BLOCKS),
    "mxfp4": Variant("MXFP4 as in the paper (1x32, UE8M0 rounded up, RHT 32, SR, 32x32 weight tiles)", "mxfp4"),
    "switch_all": Variant("NVFP4, all GEMMs to BF16 for the last 18% of steps", switch="all"),
    "switch_fwd": Variant("NVFP4, Fprop to BF16 for the last 18% of steps", switch="forward"),
    "switch_bwd": Variant("NVFP4, Dgrad and Wgrad to BF16 for the last 18% of steps (control)", switch="backward"),
    "sr_forward": Variant("negative control: SR also on the Fprop operands (App. E.3)",
                          changes=dict(stochastic_roles=("fprop_input", "fprop_weight", *PAPER_STOCHASTIC_ROLES))),
    "rht_all": Variant("negative control: RHT on all three GEMMs, weights 1x16 there (App. E.4)",
                       changes=dict(rht_gemms=GEMMS)),
}
REFERENCES = ("nvfp4", "fp8", "bf16")


def model_blocks(base: RunSpec) -> int:
    """The number of transformer blocks of the recipe's model (for the FP8 baseline's share)."""
    cfg = base.model.config
    if cfg is None:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(base.model.name_or_path, trust_remote_code=base.model.trust_remote_code)
        cfg = cfg.to_dict()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise ValueError("ablate: cannot tell the model's number of blocks (no num_hidden_layers in its config)")


def variant_nvfp4(base: RunSpec, variant: str, seed: int | None = None) -> NVFP4Config | None:
    """The NVFP4Config (any format) of ``variant``, or None for BF16; ``seed`` replaces the recipe's."""
    v = VARIANTS[variant]
    rec = (base.nvfp4 or NVFP4Config()).to_recipe()
    if v.recipe == "bf16":
        return None
    if v.recipe in ("fp8", "fp8_nvfp4_alloc"):
        rec = fp8_baseline(model_blocks(base), "paper" if v.recipe == "fp8" else "nvfp4", like=rec)
    elif v.recipe == "mxfp4":
        rec = mxfp4_paper(rec)
    seed = rec.seed if seed is None else seed
    return NVFP4Config.from_recipe(rec.replace(**v.changes, backend="emulated", seed=seed))


# ablation.md is not deleted: its generated block is replaced, what a person wrote around it is kept
RESULT_FILES = ("runs.jsonl", "ablation.json", "ablation_loss_curves.png", "ablation_relative_gap.png",
                "ablation_paired_ci.png")


def _protect(out: Path, resume: bool, overwrite: bool) -> None:
    """Never add to or overwrite a previous sweep's results unasked."""
    from ..rundir import RunDirError

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


def variant_recipe(base: RunSpec, variant: str, seed: int, runs_dir: Path) -> RunSpec:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    nv = variant_nvfp4(base, variant, seed)
    scope = VARIANTS[variant].switch
    switch = PrecisionSwitchSection() if scope is None else PrecisionSwitchSection(at=SWITCH_AT, to="bf16",
                                                                                   scope=scope)
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


FINGERPRINT_SECTIONS = ("model", "tokenizer", "data", "training", "nvfp4", "precision_switch")


def fingerprint(recipe: RunSpec) -> str:
    """What a run's result depends on: the model, data, training, numerics and switch sections
    (not its name, output directory, logging or evaluation)."""
    d = recipe.to_dict()
    d = {k: d.get(k) for k in FINGERPRINT_SECTIONS}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def bf16_blocks(recipe: RunSpec, n_blocks: int) -> str:
    if recipe.nvfp4 is None:
        return f"{n_blocks} of {n_blocks}"
    first, last = recipe.nvfp4.resolved_bf16_blocks(n_blocks)
    return f"{first}+{last} of {n_blocks}"


def run_one(recipe: RunSpec) -> dict:
    from ..train import run_recipe

    s = run_recipe(recipe, evaluate_at_end=True, evaluate_bf16_at_end=True, quiet=True)
    return {k: s[k] for k in ("final_loss", "eval_loss", "eval_loss_bf16", "loss_curve", "tokens", "seconds")}


def _gaps(by: dict, seeds, v: str, ref: str, key: str = "eval_loss", ref_key: str = "eval_loss") -> list[float]:
    return [
        (by[(v, s)][key] - by[(ref, s)][ref_key]) / by[(ref, s)][ref_key]
        for s in seeds
        if (v, s) in by and (ref, s) in by and by[(v, s)].get(key) is not None and by[(ref, s)].get(ref_key)
    ]


def summarize(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: eval loss mean/sd over seeds; paired relative gaps (mean, sd, t 95% CI) to the
    full recipe, FP8 and BF16; and the same weights evaluated in BF16."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    table = []
    for v in variants:
        losses = [by[(v, s)]["eval_loss"] for s in seeds if (v, s) in by]
        if not losses:
            continue
        row = {"variant": v, "description": VARIANTS[v].description, "n": len(losses),
               "bf16_blocks": next(by[(v, s)].get("bf16_blocks") for s in seeds if (v, s) in by),
               "eval_loss": statistics.fmean(losses),
               "eval_loss_std": statistics.stdev(losses) if len(losses) > 1 else float("nan")}
        for ref in REFERENCES:
            row[f"vs_{ref}"] = paired_summary(_gaps(by, seeds, v, ref)) if v != ref else None
        bf = [by[(v, s)].get("eval_loss_bf16") for s in seeds if (v, s) in by]
        bf = [x for x in bf if x is not None]
        row["eval_loss_bf16"] = statistics.fmean(bf) if bf else float("nan")
        # the same weights in BF16 minus as trained; and BF16-evaluated weights vs the BF16-trained model
        row["bf16_eval_vs_own"] = paired_summary(_gaps(by, seeds, v, v, "eval_loss_bf16", "eval_loss"))
        row["bf16_eval_vs_bf16"] = paired_summary(_gaps(by, seeds, v, "bf16", "eval_loss_bf16", "eval_loss"))
        table.append(row)
    return table


def _cell(r: dict, key: str) -> str:
    s = r.get(key)
    return "(reference)" if s is None else format_interval(s)


def markdown_table(table: list[dict]) -> str:
    n = max((r["n"] for r in table), default=0)
    lines = [
        "| variant | BF16 blocks | n | eval loss (mean ± sd) | vs NVFP4 full recipe | vs FP8 | vs BF16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        sd = f" ± {r['eval_loss_std']:.4f}" if r["eval_loss_std"] == r["eval_loss_std"] else ""
        lines.append(
            f"| `{r['variant']}`: {r['description']} | {r['bf16_blocks']} | {r['n']} | {r['eval_loss']:.4f}{sd} | "
            + " | ".join(_cell(r, f"vs_{ref}") for ref in REFERENCES) + " |"
        )
    if n and any(r["n"] != n for r in table):
        lines.append("")
        lines.append("Some variants have fewer seeds than others (column n); their intervals are wider.")
    return "\n".join(lines)


def markdown_bf16_table(table: list[dict]) -> str:
    lines = [
        "| variant | n | eval loss as trained | same weights, BF16 forward | BF16 forward vs as trained | "
        "BF16 forward vs the BF16-trained model |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        if r["variant"] == "bf16":
            rest = "(nothing converted) | (reference) |"
        else:
            rest = f"{format_interval(r['bf16_eval_vs_own'])} | {format_interval(r['bf16_eval_vs_bf16'])} |"
        lines.append(f"| `{r['variant']}` | {r['n']} | {r['eval_loss']:.4f} | {r['eval_loss_bf16']:.4f} | {rest}")
    return "\n".join(lines)


def _load_runs(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def write_markdown(path: Path, body: str) -> None:
    """Write the generated part of ``path`` between the markers, keeping what a person wrote around it."""
    # a page starting with the old title was written whole by an earlier version of this command
    write_generated(path, body, "ablate", legacy_prefix="# Ablation results (")


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
    """Run (or resume, or grow) the sweep; writes runs.jsonl, ablation.md/json and plots into ``out_dir``.

    out_dir defaults to ``runs/ablate/<recipe>/results``; each run's checkpoint goes to
    ``runs_dir`` (default ``runs/ablate/<recipe>``). An ``out_dir`` that already holds a sweep
    (runs.jsonl) is an error unless ``resume`` (add the missing runs: more seeds or variants) or
    ``overwrite`` (delete its results and start over; text written around the generated block
    of ablation.md is kept).

    >>> from hf_nvfp4.science.ablate import VARIANTS
    >>> "mxfp4" in VARIANTS and "switch_bwd" in VARIANTS
    True
    """
    from tqdm.auto import tqdm

    variants = list(variants or VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    seeds = list(dict.fromkeys(seeds))
    if len(seeds) < 1:
        raise ValueError("give at least one seed")
    base = load_recipe(recipe_name, overrides)
    n_blocks = model_blocks(base)
    out_dir = out_dir or str(Path("runs") / "ablate" / base.name / "results")
    out = Path(out_dir)
    log = out / "runs.jsonl"
    _protect(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    rdir = Path(runs_dir or Path("runs") / "ablate" / base.name)
    plan = {(v, s): variant_recipe(base, v, s, rdir) for s in seeds for v in variants}
    done, stale = {}, 0
    for r in _load_runs(log):
        key = (r["variant"], r["seed"])
        if key in plan and r.get("fingerprint") == fingerprint(plan[key]):
            done[key] = r
        elif key in plan:
            stale += 1
    todo = [k for k in plan if k not in done]
    if done or stale:
        print(
            f"hf-nvfp4 ablate: resuming: {len(done)} run(s) reused from {log}, {len(todo)} to go"
            + (f"; {stale} earlier run(s) made under another definition of their variant are ignored" if stale else ""),
            flush=True,
        )
    bar = tqdm(todo, desc="ablation", unit="run")
    for v, s in bar:
        bar.set_postfix_str(f"{v} seed {s}")
        t0 = time.perf_counter()
        rec = plan[(v, s)]
        res = run_one(rec)
        row = {"variant": v, "seed": s, "fingerprint": fingerprint(rec), "bf16_blocks": bf16_blocks(rec, n_blocks),
               **res, "wall": time.perf_counter() - t0}
        with log.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(v, s)] = row
        tqdm.write(f"  {v:16s} seed {s}: eval loss {res['eval_loss']:.4f} ({row['wall']:.0f} s)")
    rows = [done[k] for k in plan]
    table = summarize(rows, variants)
    (out / "ablation.json").write_text(json.dumps(table, indent=2))
    tokens = rows[0]["tokens"] if rows else 0
    title = f"{base.name}: {len(seeds)} seeds, {tokens / 1e6:.2f}M tokens per run"
    pngs = plot(rows, table, variants, out, title, REFERENCES, list(VARIANTS))
    cmd = command or f"hf-nvfp4 ablate {recipe_name} --seeds {','.join(map(str, seeds))} --out {out_dir}"
    body = "\n".join([
        "Made with:", "", "```bash", cmd, "```", "",
        f"{title}; {sum(r['wall'] for r in rows) / 60:.0f} minutes of runs in all. Eval loss: the loss on a "
        f"held-out {base.data.eval_fraction:.0%} of the packed data after the last step. Gaps are paired by seed, "
        "(variant - reference) / reference: the mean over seeds, the sd and the Student-t 95% interval [lo, hi] "
        "(n - 1 degrees of freedom). 'unresolved' marks an interval that contains 0: no direction is claimed.",
        "", markdown_table(table), "",
        "The same trained weights evaluated with every converted layer computing in BF16 (the paper evaluates "
        "its NVFP4-trained models' downstream tasks in BF16):", "", markdown_bf16_table(table), "",
        *[f"![{p.stem}]({p.name})" for p in pngs],
    ])
    write_markdown(out / "ablation.md", body)
    print("\n" + markdown_table(table), flush=True)
    names = ", ".join(p.name for p in pngs)
    print(f"hf-nvfp4 ablate: wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {names}")
    return table
