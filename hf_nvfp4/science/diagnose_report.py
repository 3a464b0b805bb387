"""``hf-nvfp4 diagnose MODEL_DIR``: the recipe diagnostics of a checkpoint, as a report and plots.

Loads the checkpoint (converted if it was trained with hf-nvfp4), takes a real batch of its
recipe's held-out data (``recipe.json`` in the checkpoint, or ``--recipe``), runs
:func:`hf_nvfp4.diagnose` and writes ``diagnostics.json``, ``diagnostics_layers.csv``,
``diagnostics.md`` and two plots per layer depth into ``--out``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import statistics
from pathlib import Path

from ..generated import write_generated
from .diagnose import GEMMS, MECHANISMS, diagnose
from .stats import paired_summary


def checkpoint_batch(model_dir: str | Path, batch_size: int = 8, recipe=None, split: str = "eval") -> tuple:
    """(batch dict, the recipe the data came from): the first ``batch_size`` blocks of the split."""
    import torch
    from transformers import default_data_collator

    from ..data import build_datasets, build_tokenizer
    from ..recipe import load_recipe
    from ..train import run_scope

    src = recipe or Path(model_dir) / "recipe.json"
    if recipe is None and not Path(src).is_file():
        raise FileNotFoundError(f"{model_dir} has no recipe.json (not trained with hf-nvfp4 train); pass --recipe "
                                "to say which data to take the batch from")
    rec = load_recipe(src)
    with run_scope(rec, quiet=True):  # offline unless the data is on the hub; settings restored after
        train_ds, eval_ds = build_datasets(rec, build_tokenizer(rec))
        ds = eval_ds if split == "eval" and eval_ds is not None and len(eval_ds) > 0 else train_ds
        rows = list(itertools.islice(iter(ds), batch_size))  # streamed datasets too
    batch = default_data_collator(rows)
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}, rec


def load_for_diagnosis(model_dir: str | Path):
    """The checkpoint in fp32 (converted where its config says hf_nvfp4), on the CPU or the first GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_nvfp4  # noqa: F401 - registers the hf_nvfp4 quantization method

    from ..rundir import check_model_weights

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint directory (no config.json)")
    check_model_weights(model_dir, "diagnose")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "-"
    s = paired_summary(xs)
    if s["lo"] != s["lo"]:
        return f"{s['mean']:.4f}"
    return f"{s['mean']:.4f} [{s['lo']:.4f}, {s['hi']:.4f}]"


def by_block(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(r["block"] if r["block"] is not None else -1, []).append(r)
    return dict(sorted(out.items()))


DEPTH_METRICS = ("fprop_relerr", "dgrad_relerr", "wgrad_relerr", "wgrad_bias_rn", "wgrad_relerr_no_rht")


def _suffix(row: dict) -> str | None:
    """The layer's name inside its block (``self_attn.q_proj``), to pair layers across blocks."""
    parts = row["name"].split(".")
    b = str(row["block"])
    return ".".join(parts[parts.index(b) + 1:]) if row["block"] is not None and b in parts else None


def depth_contrast(rows: list[dict]) -> dict:
    """Last block minus first block, per metric, paired by the layer's name inside its block."""
    blocks = [r["block"] for r in rows if r["block"] is not None]
    if len(set(blocks)) < 2:
        return {}
    first, last = min(blocks), max(blocks)
    a = {_suffix(r): r for r in rows if r["block"] == first}
    b = {_suffix(r): r for r in rows if r["block"] == last}
    names = [n for n in a if n in b]
    out = {}
    for m in DEPTH_METRICS:
        diffs = [b[n][m] - a[n][m] for n in names if a[n][m] == a[n][m] and b[n][m] == b[n][m]]
        out[m] = {**paired_summary(diffs), "first": first, "last": last}
    return out


def markdown_report(rep: dict, title: str, command: str | None = None) -> str:
    rows, cfg = rep["layers"], rep["config"]
    rec = cfg["recipe"]
    lines = []
    if command:
        lines += ["Made with:", "", "```bash", command, "```", ""]
    lines += [
        f"{title}: {len(rows)} Linear layers ({sum(r['converted'] for r in rows)} converted), "
        f"{rows[0]['tokens'] if rows else 0} tokens of one batch, {cfg['draws']} stochastic-rounding draws per "
        f"stochastic GEMM, recipe format `{rec['format']}` (RHT size {rec['rht_size']}). Layers in BF16 blocks are "
        "diagnosed as if converted with the same recipe. Intervals: Student-t 95% over layers "
        "(mechanism table, per-block table) or over SR draws (jackknife; per-layer bias).",
        "",
        "## Each mechanism, paired over layers (without minus with)",
        "",
        "| mechanism | mean without | mean with | without - with: mean [95% CI] | n layers | resolved |",
        "|---|---|---|---|---|---|",
    ]
    for s in rep["summary"].values():
        ci = "-" if s["n"] == 0 else f"{s['mean']:+.4f}" + (
            f" [{s['lo']:+.4f}, {s['hi']:+.4f}]" if s["lo"] == s["lo"] else "")
        lines.append(f"| {s['what']} | {_fmt(s['without'])} | {_fmt(s['with_'])} | {ci} | {s['n']} | "
                     f"{'yes' if s['resolved'] else 'no'} |")
    for g, c in rep.get("sr_layers", {}).items():
        lines.append("")
        lines.append(f"{g.capitalize()} with SR, per layer: the 95% interval of the bias contains 0 in "
                     f"{c['sr_interval_contains_0']} of {c['n']} layers and lies wholly below the nearest-rounding "
                     f"bias in {c['sr_interval_below_rn']} of {c['n']}.")
    depth = depth_contrast(rows)
    if depth:
        d0 = next(iter(depth.values()))
        head = f"## Depth: block {d0['last']} minus block {d0['first']}, paired by layer (q_proj with q_proj, ...)"
        lines += ["", head,
                  "", "| metric | mean difference [95% CI] | n pairs | resolved |", "|---|---|---|---|"]
        for m, s in depth.items():
            ci = f" [{s['lo']:+.4f}, {s['hi']:+.4f}]" if s["lo"] == s["lo"] else ""
            lines.append(f"| {m} | {s['mean']:+.4f}{ci} | {s['n']} | {'yes' if s['resolved'] else 'no'} |")
    lines += ["", "## Per block (mean over the block's layers [95% CI])", "",
              "| block | layers | Fprop rel. error | Dgrad rel. error | Wgrad rel. error | Wgrad bias RN | "
              "Wgrad bias SR | activation saturation | gradient underflow |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b, rs in by_block(rows).items():
        cells = [_ci([r[k] for r in rs]) for k in ("fprop_relerr", "dgrad_relerr", "wgrad_relerr", "wgrad_bias_rn",
                                                    "wgrad_bias_sr", "act_saturation", "wgrad_grad_underflow")]
        conv = sum(r["converted"] for r in rs)
        where = b if b >= 0 else "outside blocks"
        lines.append(f"| {where} | {len(rs)} ({conv} converted) | " + " | ".join(cells) + " |")
    lines += ["", "## Per layer", "",
              "| layer | conv. | Fprop err | Dgrad err | Wgrad err | BF16 Wgrad err | Wgrad bias RN | "
              "Wgrad bias SR [95% CI] | Wgrad err RHT / none | dy crest before / after RHT | W mismatch 1D / 2D | "
              "act under / sat | dy under / sat |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | {'yes' if r['converted'] else 'no'} | {_fmt(r['fprop_relerr'])} | "
            f"{_fmt(r['dgrad_relerr'])} | {_fmt(r['wgrad_relerr'])} | {_fmt(r['wgrad_relerr_bf16'])} | "
            f"{_fmt(r['wgrad_bias_rn'])} | {_fmt(r['wgrad_bias_sr'])} [{_fmt(r['wgrad_bias_sr_lo'])}, "
            f"{_fmt(r['wgrad_bias_sr_hi'])}] | {_fmt(r['wgrad_relerr_rht'])} / {_fmt(r['wgrad_relerr_no_rht'])} | "
            f"{_fmt(r['wgrad_grad_crest'], 2)} / {_fmt(r['wgrad_grad_crest_rht'], 2)} | "
            f"{_fmt(r['weight_mismatch_1d'])} / {_fmt(r['weight_mismatch_2d'])} | "
            f"{_fmt(r['act_underflow'])} / {_fmt(r['act_saturation'])} | "
            f"{_fmt(r['grad_underflow'])} / {_fmt(r['grad_saturation'])} |"
        )
    return "\n".join(lines)


def plot_depth(rep: dict, out_dir: Path, title: str) -> list[Path]:
    """diagnostics_depth.png: every metric against the layer's block index (mean and 95% CI per block)."""
    from .ablate_plots import _plt

    plt = _plt()
    blocks = by_block(rep["layers"])
    xs = list(blocks)

    def series(ax, key, label, style="-o", offset=0.0):
        m, lo, hi = [], [], []
        for b in xs:
            vals = [r[key] for r in blocks[b] if r.get(key) == r.get(key)]
            s = paired_summary(vals) if vals else None
            m.append(s["mean"] if s else math.nan)
            ok = s and s["lo"] == s["lo"]
            lo.append(s["mean"] - s["lo"] if ok else 0.0)
            hi.append(s["hi"] - s["mean"] if ok else 0.0)
        ax.errorbar([x + offset for x in xs], m, yerr=[lo, hi], fmt=style, capsize=3, label=label, markersize=4)

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    ax = axes[0, 0]
    for i, g in enumerate(GEMMS):
        series(ax, f"{g}_relerr", g, offset=0.08 * (i - 1))
    series(ax, "wgrad_relerr_bf16", "wgrad, BF16 operands", "--x")
    ax.set(title="relative error of each GEMM vs exact", ylabel="||Q - exact|| / ||exact||")
    ax = axes[0, 1]
    series(ax, "wgrad_bias_rn", "Wgrad, nearest", offset=-0.1)
    series(ax, "wgrad_bias_sr", "Wgrad, SR", offset=-0.05)
    series(ax, "dgrad_bias_rn", "Dgrad, nearest", "--s", offset=0.05)
    series(ax, "dgrad_bias_sr", "Dgrad, SR", "--s", offset=0.1)
    ax.set(title="gradient bias from rounding the gradient", ylabel="||E[Q] - exact|| / ||exact||")
    ax = axes[0, 2]
    series(ax, "wgrad_relerr_no_rht", "Wgrad without RHT", offset=-0.05)
    series(ax, "wgrad_relerr_rht", "Wgrad with RHT", offset=0.05)
    ax.set(title="Wgrad relative error, RHT on/off", ylabel="relative error")
    ax = axes[1, 0]
    for key, label in (("wgrad_grad_crest", "dy before RHT"), ("wgrad_grad_crest_rht", "dy after RHT"),
                       ("wgrad_act_crest", "x before RHT"), ("wgrad_act_crest_rht", "x after RHT")):
        series(ax, key, label, "-o" if "act" not in key else "--s")
    ax.set(title="Wgrad operands: block max / rms", ylabel="max/rms per block")
    ax = axes[1, 1]
    for key, label in (("weight_mismatch_1d", "Fprop vs Dgrad W, 1D"), ("weight_mismatch_2d", "Fprop vs Dgrad W, 2D"),
                       ("weight_err_1d", "W error, 1D"), ("weight_err_2d", "W error, 2D")):
        series(ax, key, label, "-o" if "mismatch" in key else "--s")
    ax.set(title="weight: forward/backward mismatch and error", ylabel="||.|| / ||W||")
    ax = axes[1, 2]
    for key, label in (("act_saturation", "activations saturated"), ("grad_saturation", "gradients saturated"),
                       ("act_underflow", "activations underflow"), ("grad_underflow", "gradients underflow"),
                       ("wgrad_grad_underflow", "Wgrad dy underflow"), ("weight_underflow", "weights underflow")):
        series(ax, key, label, "-o" if "saturated" in label else "--s")
    ax.set(title="saturation and underflow rates", ylabel="share of elements")
    for a in axes.flat:
        a.set_xlabel("block (depth)")
        a.set_xticks(xs, [str(x) if x >= 0 else "other" for x in xs])
        a.legend(fontsize=7)
    fig.suptitle(f"{title} (mean over each block's layers, 95% CI)", fontsize=10)
    fig.tight_layout()
    paths = [out_dir / "diagnostics_depth.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    return paths


def write_report(rep: dict, out_dir: str | Path, title: str, command: str | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(rep, indent=1, default=str))
    rows = rep["layers"]
    with (out / "diagnostics_layers.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pngs = plot_depth(rep, out, title)
    body = markdown_report(rep, title, command) + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs)
    md = out / "diagnostics.md"
    write_generated(md, body, "diagnose")
    return [out / "diagnostics.json", out / "diagnostics_layers.csv", md, *pngs]


def diagnose_checkpoint(model_dir, out_dir=None, *, batch_size: int = 8, draws: int = 16, max_tokens: int = 4096,
                        seed: int = 0, recipe=None, split: str = "eval", command: str | None = None) -> dict:
    """Diagnose a checkpoint on a real batch of its data; writes the report into ``out_dir``."""
    from .ablate_plots import _plt

    _plt()  # the report's plots need matplotlib: fail before a minute of computing, not after
    model = load_for_diagnosis(model_dir)
    batch, rec = checkpoint_batch(model_dir, batch_size, recipe, split)
    rep = diagnose(model, batch, draws=draws, seed=seed, max_tokens=max_tokens)
    rep["config"].update(model_dir=str(model_dir), data=rec.name, split=split, batch_size=batch_size)
    out = Path(out_dir or Path(model_dir) / "diagnostics")
    write_report(rep, out, f"{Path(model_dir).name} ({rec.name})", command)
    return rep


def summary_lines(rep: dict) -> list[str]:
    out = []
    for s in rep["summary"].values():
        ci = f"[{s['lo']:+.4f}, {s['hi']:+.4f}]" if s["lo"] == s["lo"] else "(no interval)"
        out.append(f"  {s['what']:58s} {s['mean']:+.4f} {ci} n={s['n']}{'' if s['resolved'] else '  unresolved'}")
    for g in GEMMS:
        vals = [r[f"{g}_relerr"] for r in rep["layers"] if r["converted"]]
        if vals:
            out.append(f"  {g} relative error (converted layers, mean)            {statistics.fmean(vals):.4f}")
    return out


__all__ = ["MECHANISMS", "checkpoint_batch", "depth_contrast", "diagnose_checkpoint", "load_for_diagnosis",
           "markdown_report", "plot_depth", "write_report"]
