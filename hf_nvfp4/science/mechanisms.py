"""``hf-nvfp4 mechanisms RUN_DIR --experiment NAME``: the recipe's mechanisms, measured over checkpoints x batches.

Five experiments, each one command on a run directory with ``checkpoint-N`` folders (a run of
``hf-nvfp4 train`` with ``training.save_steps``), each writing ``NAME.json``, ``NAME.csv`` and
``NAME.png``. The replication unit of every test is stated in its table (``unit``): a
checkpoint x batch pair (or checkpoint x batch sequence, or a training seed), never a layer.

- ``sr_accumulation``: running sums of the Wgrad and Dgrad estimates over B = 1..B_max batches
  with nearest rounding (RN), stochastic rounding (SR) and SR with block scales rounded *up*
  (no block maximum is clamped), against the sum of the GEMMs with the exact gradient operand.
  Bias shows as a plateau, noise as a 1/sqrt(B) fall.
- ``rht``: per checkpoint x batch, the Wgrad error with and without the RHT (regressed on dy's
  kurtosis), dy^T underflow with and without, SR variance with and without, RHT sizes 4-128.
- ``consistency``: 2D (16x16 weight reused by Dgrad) vs 1D (1x16 forward, W^T blocked apart for
  Dgrad): cosine and relative error of the whole-model gradient against the exact gradient of
  each one's own quantized forward (straight-through autograd through the fake quantization);
  then paired training steps from one checkpoint.
- ``depth``: one block at a time in NVFP4 (the rest BF16): loss increase over paired eval
  batches and gradient cosine against BF16, per block.
- ``late_switch``: Delta(t) = loss with NVFP4 forward - loss with BF16 forward across
  checkpoints; then branches from the checkpoint nearest 0.82 of training (keep / switch all /
  forward only / backward only) over seeds fixed in advance.

Statistics: :mod:`hf_nvfp4.science.multiple` (Student-t intervals, scipy). Each experiment
stores raw p-values; :func:`write_page` corrects them all together (Holm) for the page.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import time
from pathlib import Path

import torch

from ..config import as_recipe
from ..formats.e2m1 import round_e2m1_stochastic, signed
from ..formats.nvfp4 import _tensor_scalars
from ..formats.registry import _rht, get_format
from ..nn.linear import NVFP4Linear
from ..ops.roles import role_table
from .diagnose import _basis, _dgrad_weight, _q, capture, outlier_stats, quant_health, target_layers
from .multiple import correct, regression_row, t_row

EXPERIMENTS = ("sr_accumulation", "rht", "consistency", "depth", "late_switch")


# -- run directory: checkpoints, batches, models -----------------------------------------------------------
def run_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoint-N`` of the run, oldest first, then the final model (if saved)."""
    from ..rundir import checkpoints

    out = sorted((int(p.name.split("-")[1]), p) for p in checkpoints(run_dir))
    final = Path(run_dir)
    if (final / "config.json").is_file() and (final / "trainer_state.json").is_file():
        step = json.loads((final / "trainer_state.json").read_text()).get("global_step", 0)
        if not out or step > out[-1][0]:
            out.append((int(step), final))
    if not out:
        raise FileNotFoundError(f"{run_dir}: no checkpoint-N folders (train with training.save_steps > 0)")
    return out


def max_steps(run_dir) -> int:
    return int(json.loads((Path(run_dir) / "recipe.json").read_text())["training"]["max_steps"])


def load_batches(run_dir, n: int, batch_size: int, split: str = "eval", offset: int = 0) -> list[dict]:
    """``n`` batches of ``batch_size`` sequences of the run's data (its ``recipe.json``), in order."""
    import itertools

    from transformers import default_data_collator

    from ..data import build_datasets, build_tokenizer
    from ..recipe import load_recipe
    from ..train import run_scope

    rec = load_recipe(Path(run_dir) / "recipe.json")
    with run_scope(rec, quiet=True):
        train_ds, eval_ds = build_datasets(rec, build_tokenizer(rec))
        ds = eval_ds if split == "eval" and eval_ds is not None else train_ds
        rows = list(itertools.islice(iter(ds), offset * batch_size, (offset + n) * batch_size))
    if len(rows) < n * batch_size:  # a small eval split: wrap around (batches then repeat; said in the config)
        rows = [rows[i % len(rows)] for i in range(n * batch_size)]
    out = []
    for i in range(n):
        b = default_data_collator(rows[i * batch_size : (i + 1) * batch_size])
        out.append({k: v for k, v in b.items() if isinstance(v, torch.Tensor)})
    return out


def load_model(path):
    """The checkpoint in fp32, converted with its own recipe (as ``hf-nvfp4 diagnose`` loads it)."""
    from .diagnose_report import load_for_diagnosis

    return load_for_diagnosis(path).cpu()


def _loss(model, batch) -> torch.Tensor:
    kw = dict(batch)
    kw.setdefault("labels", kw["input_ids"])
    return model(**kw).loss


def _converted(model) -> list[tuple[str, torch.nn.Module, int | None]]:
    return [t for t in target_layers(model) if isinstance(t[1], NVFP4Linear)]


def _rel(a, ref) -> float:
    return float((a - ref).norm() / ref.norm().clamp(min=1e-30))


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _pick(ckpts, which: str | None, default: int):
    """Checkpoints by a comma list of steps, or the last ``default`` ones."""
    if which:
        steps = {int(s) for s in str(which).split(",")}
        got = [c for c in ckpts if c[0] in steps]
        if len(got) != len(steps):
            raise ValueError(f"--checkpoints {which}: the run has steps {[c[0] for c in ckpts]}")
        return got
    return ckpts[-default:]


# -- SR with block scales rounded up: the clamping part of SR's residual bias ----------------------------------
def _next_e4m3_up(s: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """``s`` (an E4M3 value) moved one E4M3 step up where it lies below ``want``."""
    bits = s.to(torch.float8_e4m3fn).view(torch.uint8)
    up = (bits + 1).clamp(max=0x7E).view(torch.float8_e4m3fn).float()
    return torch.where(s < want, up, s)


def fake_sr_scale_up(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """NVFP4 1x16 fake quantization with stochastic rounding, each block's E4M3 scale rounded up.

    The format's own container gives the per-tensor factor and the nearest-rounded scales; a scale
    that rounded below the block's max/6 moves one E4M3 step up, so no element is clamped and SR
    is unbiased inside every block. The rest is the format's E2M1 stochastic rounding.
    """
    fmt = get_format("nvfp4")
    q = fmt.quantize(t, tile=(1, 16))
    k = t.shape[-1]
    pad = (-k) % 16
    x2 = torch.nn.functional.pad(t.float(), (0, pad)) if pad else t.float()
    xb = x2.reshape(-1, 16)
    mult, s_dec, g = _tensor_scalars(q.amax)
    vmax = xb.abs().amax(-1, keepdim=True)
    scale = _next_e4m3_up(q.scale.float().reshape(-1, 1), vmax * mult)
    enc = torch.reciprocal(scale * s_dec).nan_to_num(posinf=0.0)
    v = xb * enc
    a = v.abs().clamp(max=6.0)
    u = torch.rand(a.shape, generator=generator)
    out = signed(round_e2m1_stochastic(a, u), v) * scale * g
    return out.reshape(x2.shape)[:, :k].to(t.dtype)


# -- 1: SR accumulation -------------------------------------------------------------------------------------
def sr_accumulation(
    run_dir,
    *,
    checkpoints: str | None = None,
    n_checkpoints: int = 2,
    sequences: int = 2,
    batches: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    log=print,
) -> dict:
    """Relative error of running sums over B batches: RN, SR, SR with scales rounded up (module docstring)."""
    ckpts = _pick(run_checkpoints(run_dir), checkpoints, n_checkpoints)
    data = load_batches(run_dir, sequences * batches, batch_size, split="train")
    arms = ("rn", "sr", "sr_up")
    curves, units = [], []
    for step, path in ckpts:
        model = load_model(path)
        rec = model.nvfp4_state.recipe
        mech = role_table(rec.replace(disable_stochastic_rounding=False))
        off = role_table(rec.replace(disable_stochastic_rounding=True))
        layers = _converted(model)
        for s in range(sequences):
            gen = _gen(seed * 7919 + step * 31 + s)
            sums = {g: {a: {} for a in (*arms, "exact", "exact_sq")} for g in ("wgrad", "dgrad")}
            curve = {f"{g}_{a}": [] for g in ("wgrad", "dgrad") for a in arms}
            noise = {}
            for b in range(batches):
                caps = capture(model, data[s * batches + b], layers)
                with torch.no_grad():
                    for name, mod, _ in layers:
                        if name not in caps:
                            continue
                        x, dy, w = caps[name]["x"].float(), caps[name]["dy"].float(), mod.weight.detach().float()
                        for g, role, src, other in (
                            ("wgrad", "wgrad_grad_output", dy.t(), _q(x.t(), off["wgrad_input"]).t()),
                            ("dgrad", "dgrad_grad_output", dy, _dgrad_weight(w, off)),
                        ):
                            ex = _basis(src, off[role]) @ other
                            est = {"rn": _q(src, off[role]) @ other, "sr": _q(src, mech[role], gen) @ other}
                            est["sr_up"] = fake_sr_scale_up(_basis(src, off[role]), gen) @ other
                            d = sums[g]
                            for a in arms:
                                d[a][name] = d[a].get(name, 0) + est[a]
                            d["exact"][name] = d["exact"].get(name, 0) + ex
                            d["exact_sq"][name] = d["exact_sq"].get(name, 0) + ex.pow(2).sum()
                for g in ("wgrad", "dgrad"):
                    d = sums[g]
                    ref = torch.cat([v.reshape(-1) for v in d["exact"].values()])
                    for a in arms:
                        est = torch.cat([d[a][n].reshape(-1) for n in d["exact"]])
                        curve[f"{g}_{a}"].append(_rel(est, ref))
            for g in ("wgrad", "dgrad"):  # minibatch noise: sd of one batch's exact gradient around the mean, relative
                d = sums[g]
                mean = torch.cat([(v / batches).reshape(-1) for v in d["exact"].values()])
                ss = sum(float(v) for v in d["exact_sq"].values()) / batches
                var1 = max(ss - float(mean.pow(2).sum()), 0.0) * batches / max(batches - 1, 1)
                noise[g] = math.sqrt(var1) / float(mean.norm().clamp(min=1e-30))
            unit = {"checkpoint": step, "sequence": s}
            for g in ("wgrad", "dgrad"):
                rn, sr, up = curve[f"{g}_rn"], curve[f"{g}_sr"], curve[f"{g}_sr_up"]
                below = [i for i in range(batches) if all(sr[j] < rn[j] for j in range(i, batches))]
                unit[f"{g}_b_star"] = below[0] + 1 if below else None
                unit[f"{g}_rn_final"], unit[f"{g}_sr_final"], unit[f"{g}_sr_up_final"] = rn[-1], sr[-1], up[-1]
                unit[f"{g}_noise_1"] = noise[g]
                # batches of averaging at which the minibatch noise falls to RN's plateau
                unit[f"{g}_b_noise"] = (noise[g] / rn[-1]) ** 2 if rn[-1] > 0 else None
            units.append(unit)
            curves.append({"checkpoint": step, "sequence": s, **curve})
            log(
                f"sr_accumulation: checkpoint {step} sequence {s}: wgrad RN {unit['wgrad_rn_final']:.4f} "
                f"SR {unit['wgrad_sr_final']:.4f} SR-up {unit['wgrad_sr_up_final']:.4f} B*={unit['wgrad_b_star']}"
            )
    unit_txt = f"checkpoint x batch sequence ({len(ckpts)} x {sequences})"
    rows = []
    for g in ("wgrad", "dgrad"):
        rows.append(
            t_row(
                [u[f"{g}_rn_final"] - u[f"{g}_sr_final"] for u in units],
                test=f"{g}: running-sum error at B={batches}, RN minus SR",
                unit=unit_txt,
            )
        )
        rows.append(
            t_row(
                [u[f"{g}_sr_final"] - u[f"{g}_sr_up_final"] for u in units],
                test=f"{g}: running-sum error at B={batches}, SR minus SR with scales rounded up",
                unit=unit_txt,
            )
        )
        rows.append(
            t_row(
                [math.log(u[f"{g}_rn_final"] / u[f"{g}_noise_1"]) for u in units],
                test=f"{g}: log(RN plateau / one batch's minibatch noise)",
                unit=unit_txt,
            )
        )
    desc = []
    for g in ("wgrad", "dgrad"):
        bs = [u[f"{g}_b_star"] for u in units]
        bn = [u[f"{g}_b_noise"] for u in units]
        desc.append(
            {
                "gemm": g,
                "b_star": bs,
                "b_noise": bn,
                "rn_final": [u[f"{g}_rn_final"] for u in units],
                "sr_final": [u[f"{g}_sr_final"] for u in units],
                "sr_up_final": [u[f"{g}_sr_up_final"] for u in units],
                "noise_1": [u[f"{g}_noise_1"] for u in units],
            }
        )
    return {
        "experiment": "sr_accumulation",
        "config": {
            "run_dir": str(run_dir),
            "checkpoints": [c[0] for c in ckpts],
            "sequences": sequences,
            "batches": batches,
            "batch_size": batch_size,
            "seed": seed,
            "split": "train",
            "reference": "the GEMM with the exact gradient operand (the other operand as quantized)",
        },
        "tables": [
            {"title": "SR accumulation: differences at the end of the running sum", "unit": unit_txt, "rows": rows}
        ],
        "units": units,
        "descriptive": desc,
        "curves": curves,
    }


def _plot_sr_accumulation(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"rn": "C3", "sr": "C0", "sr_up": "C2"}
    for ax, g in zip(axes, ("wgrad", "dgrad"), strict=True):
        for i, c in enumerate(res["curves"]):
            for a, col in colors.items():
                ys = c[f"{g}_{a}"]
                ax.plot(
                    range(1, len(ys) + 1),
                    ys,
                    color=col,
                    alpha=0.6,
                    label={"rn": "RN", "sr": "SR", "sr_up": "SR, scales rounded up"}[a] if i == 0 else None,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B (batches summed)")
        ax.set_ylabel("relative error of the running sum")
        ax.set_title(g.capitalize())
        ax.legend(fontsize=8)
    fig.suptitle("SR accumulation: one line per checkpoint x batch sequence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 2: RHT across checkpoints ------------------------------------------------------------------------------
RHT_SIZES = (4, 16, 64, 128)


def _wgrad_parts(x, dy, spec_go, spec_in, gen=None, size=None):
    """(estimate, reference) of Wgrad, both in the same basis; ``size`` forces a Hadamard size (any power of 2)."""
    fmt = get_format(spec_go.format)
    a, b = dy.t(), x.t()
    if size is not None:
        a, b = _rht(a, size, 16), _rht(b, size, 16)
        qa = fmt.fake_quantize(a, tile=spec_go.tile)
        qb = fmt.fake_quantize(b, tile=spec_in.tile)
        return qa @ qb.t(), a @ b.t()
    return _q(a, spec_go, gen) @ _q(b, spec_in).t(), _basis(a, spec_go) @ _basis(b, spec_in).t()


def rht(
    run_dir,
    *,
    checkpoints: str | None = None,
    n_checkpoints: int = 4,
    batches: int = 4,
    batch_size: int = 4,
    draws: int = 4,
    seed: int = 0,
    log=print,
) -> dict:
    """The RHT per checkpoint x batch: Wgrad error, dy^T underflow, SR variance, Hadamard sizes."""
    ckpts = _pick(run_checkpoints(run_dir), checkpoints, n_checkpoints)
    data = load_batches(run_dir, batches, batch_size)
    units = []
    for step, path in ckpts:
        model = load_model(path)
        rec = model.nvfp4_state.recipe.replace(rht_size=16)
        rn = {
            t: role_table(rec.replace(disable_stochastic_rounding=True, disable_rht=t == "off")) for t in ("on", "off")
        }
        sr = {
            t: role_table(rec.replace(disable_stochastic_rounding=False, disable_rht=t == "off")) for t in ("on", "off")
        }
        layers = _converted(model)
        for bi, batch in enumerate(data):
            caps = capture(model, batch, layers)
            gen = _gen(seed * 7919 + step * 31 + bi)
            acc = {k: 0.0 for k in ("err_on", "err_off", "ref", "var_on", "var_off", "refsr")}
            acc |= {f"size_{s}": 0.0 for s in RHT_SIZES} | {f"ref_{s}": 0.0 for s in RHT_SIZES}
            kurt, under_on, under_off = [], [], []
            with torch.no_grad():
                for name, _mod, _ in layers:
                    if name not in caps:
                        continue
                    x, dy = caps[name]["x"].float(), caps[name]["dy"].float()
                    for t in ("on", "off"):
                        est, ref = _wgrad_parts(x, dy, rn[t]["wgrad_grad_output"], rn[t]["wgrad_input"])
                        acc[f"err_{t}"] += float((est - ref).pow(2).sum())
                        if t == "off":
                            acc["ref"] += float(ref.pow(2).sum())
                        ds = [
                            _wgrad_parts(x, dy, sr[t]["wgrad_grad_output"], sr[t]["wgrad_input"], gen)[0]
                            for _ in range(draws)
                        ]
                        st = torch.stack(ds)
                        acc[f"var_{t}"] += float((st - st.mean(0)).pow(2).sum()) / (draws - 1)
                        if t == "off":
                            acc["refsr"] += float(ref.pow(2).sum())
                    for s in RHT_SIZES:
                        est, ref = _wgrad_parts(x, dy, rn["on"]["wgrad_grad_output"], rn["on"]["wgrad_input"], size=s)
                        acc[f"size_{s}"] += float((est - ref).pow(2).sum())
                        acc[f"ref_{s}"] += float(ref.pow(2).sum())
                    kurt.append(outlier_stats(dy.t(), 16)[0])
                    under_on.append(quant_health(dy.t(), rn["on"]["wgrad_grad_output"])[0])
                    under_off.append(quant_health(dy.t(), rn["off"]["wgrad_grad_output"])[0])
            u = {
                "checkpoint": step,
                "batch": bi,
                "wgrad_err_rht": math.sqrt(acc["err_on"] / acc["ref"]),
                "wgrad_err_no_rht": math.sqrt(acc["err_off"] / acc["ref"]),
                "sr_var_rht": acc["var_on"] / acc["refsr"],
                "sr_var_no_rht": acc["var_off"] / acc["refsr"],
                "dy_kurtosis": sum(kurt) / len(kurt),
                "dyT_underflow_rht": sum(under_on) / len(under_on),
                "dyT_underflow_no_rht": sum(under_off) / len(under_off),
            }
            for s in RHT_SIZES:
                u[f"wgrad_err_size_{s}"] = math.sqrt(acc[f"size_{s}"] / acc[f"ref_{s}"])
            units.append(u)
            log(
                f"rht: checkpoint {step} batch {bi}: err {u['wgrad_err_no_rht']:.4f} -> {u['wgrad_err_rht']:.4f}, "
                f"underflow {u['dyT_underflow_no_rht']:.3f} -> {u['dyT_underflow_rht']:.3f}, "
                f"kurtosis {u['dy_kurtosis']:.1f}"
            )
    unit_txt = f"checkpoint x batch ({len(ckpts)} x {batches})"
    diff = [u["wgrad_err_no_rht"] - u["wgrad_err_rht"] for u in units]
    rows = [
        t_row(diff, test="Wgrad rel. error (RN), without RHT minus with", unit=unit_txt),
        t_row(
            [u["dyT_underflow_no_rht"] - u["dyT_underflow_rht"] for u in units],
            test="dy^T underflow (non-zero -> 0), without RHT minus with",
            unit=unit_txt,
        ),
        t_row(
            [math.log(u["sr_var_no_rht"] / u["sr_var_rht"]) for u in units],
            test="log(SR variance of Wgrad without RHT / with)",
            unit=unit_txt,
        ),
        regression_row(
            [u["dy_kurtosis"] for u in units],
            diff,
            test="slope of (error without - with RHT) on dy row kurtosis",
            unit=unit_txt,
        ),
    ]
    for s in (4, 64, 128):
        rows.append(
            t_row(
                [u[f"wgrad_err_size_{s}"] - u["wgrad_err_size_16"] for u in units],
                test=f"Wgrad rel. error (RN), RHT size {s} minus size 16",
                unit=unit_txt,
            )
        )
    per_ckpt = []
    for step, _ in ckpts:
        us = [u for u in units if u["checkpoint"] == step]
        per_ckpt.append(
            t_row(
                [u["wgrad_err_no_rht"] - u["wgrad_err_rht"] for u in us],
                test=f"checkpoint {step}: Wgrad error without RHT minus with",
                unit=f"batch ({len(us)}), one checkpoint",
            )
        )
    return {
        "experiment": "rht",
        "config": {
            "run_dir": str(run_dir),
            "checkpoints": [c[0] for c in ckpts],
            "batches": batches,
            "batch_size": batch_size,
            "draws": draws,
            "seed": seed,
            "split": "eval",
            "note": "errors pooled over the converted layers of each unit (Frobenius); the RHT "
            "comparison uses nearest rounding so that SR noise does not enter it",
        },
        "tables": [
            {"title": "RHT, pooled over checkpoints x batches", "unit": unit_txt, "rows": rows},
            {"title": "RHT Wgrad error, per checkpoint", "unit": "batch, within one checkpoint", "rows": per_ckpt},
        ],
        "units": units,
    }


def _plot_rht(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    us = res["units"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    ax = axes[0]
    for step in sorted({u["checkpoint"] for u in us}):
        pts = [u for u in us if u["checkpoint"] == step]
        ax.scatter(
            [u["dy_kurtosis"] for u in pts],
            [u["wgrad_err_no_rht"] - u["wgrad_err_rht"] for u in pts],
            label=f"step {step}",
        )
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("dy row kurtosis")
    ax.set_ylabel("Wgrad error: without RHT - with")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.scatter([u["dyT_underflow_no_rht"] for u in us], [u["dyT_underflow_rht"] for u in us])
    lim = max(max(u["dyT_underflow_no_rht"] for u in us), 1e-3) * 1.1
    ax.plot([0, lim], [0, lim], "k--", lw=0.5)
    ax.set_xlabel("dy^T underflow without RHT")
    ax.set_ylabel("with RHT")
    ax = axes[2]
    sizes = ("none", *RHT_SIZES)
    vals = [[u["wgrad_err_no_rht"] for u in us]] + [[u[f"wgrad_err_size_{s}"] for u in us] for s in RHT_SIZES]
    ax.boxplot(vals, tick_labels=[str(s) for s in sizes])
    ax.set_xlabel("RHT size")
    ax.set_ylabel("Wgrad rel. error (RN)")
    fig.suptitle("RHT across checkpoints x batches")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 3: 2D scaling and gradient consistency ------------------------------------------------------------------
class _Probe(torch.autograd.Function):
    """Fprop as the roles quantize it; backward either exact for that forward (straight-through:
    dx = dy Q(W), dW = dy^T Q(x)) or as the recipe computes it (quantized dy, the Dgrad weight of
    the role table, Wgrad with its RHT and SR)."""

    @staticmethod
    def forward(ctx, x, w, roles, mode, gen):
        x2 = x.reshape(-1, x.shape[-1]).float()
        qx = _q(x2, roles["fprop_input"])
        qw = _q(w.float(), roles["fprop_weight"])
        ctx.save_for_backward(x2, w, qx, qw)
        ctx.roles, ctx.mode, ctx.gen, ctx.shape = roles, mode, gen, x.shape
        return (qx @ qw.t()).reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x2, w, qx, qw = ctx.saved_tensors
        r, gen = ctx.roles, ctx.gen
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        if ctx.mode == "exact":
            dx, dw = dy2 @ qw, dy2.t() @ qx
        else:
            dx = (_q(dy2, r["dgrad_grad_output"], gen) @ _dgrad_weight(w.float(), r, gen))[:, : w.shape[1]]
            dw = _q(dy2.t(), r["wgrad_grad_output"], gen) @ _q(x2.t(), r["wgrad_input"], gen).t()
        return dx.reshape(ctx.shape).to(dy.dtype), dw.to(w.dtype), None, None, None


@contextlib.contextmanager
def _probed(model, roles, mode, gen):
    mods = [m for m in model.modules() if isinstance(m, NVFP4Linear)]
    for m in mods:

        def fwd(x, m=m):
            y = _Probe.apply(x, m.weight, roles, mode, gen)
            return y + m.bias if m.bias is not None else y

        m.forward = fwd
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _grad_vector(model, batch) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(_loss(model, batch), params, allow_unused=True)
    return torch.cat(
        [(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params, strict=True)]
    )


def _cos(a, b) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def _train_steps(model, batches, lrs, seed: int) -> None:
    """Plain AdamW steps (betas of the recipe run) on ``batches`` at learning rates ``lrs``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lrs[0], betas=(0.9, 0.95), weight_decay=0.1
    )
    model.train()
    for b, lr in zip(batches, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        _loss(model, b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()


def _eval_losses(model, batches) -> list[float]:
    with torch.no_grad():
        return [float(_loss(model, b)) for b in batches]


def _lr_schedule(run_dir, start: int, n: int) -> list[float]:
    """The run's learning rates at steps start..start+n-1 (its warmup-stable-decay schedule)."""
    from transformers import get_scheduler

    t = json.loads((Path(run_dir) / "recipe.json").read_text())["training"]
    total = t["max_steps"]
    decay = int(round(t["decay_fraction"] * total))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=t["lr"])
    sched = get_scheduler(
        "warmup_stable_decay",
        opt,
        num_warmup_steps=min(t["warmup_steps"], total - decay),
        num_training_steps=total,
        scheduler_specific_kwargs={"num_decay_steps": decay, "min_lr_ratio": t.get("min_lr_ratio", 0.0)},
    )
    lrs = []
    for s in range(start + n):
        if s >= start:
            lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def consistency(
    run_dir,
    *,
    checkpoints: str | None = None,
    n_checkpoints: int = 4,
    batches: int = 2,
    batch_size: int = 4,
    steps: int = 30,
    seeds: int = 3,
    seed: int = 0,
    log=print,
) -> dict:
    """2D vs 1D weight scaling: gradient consistency per checkpoint x batch, then paired steps (module docstring)."""
    ckpts = _pick(run_checkpoints(run_dir), checkpoints, n_checkpoints)
    data = load_batches(run_dir, batches, batch_size)
    units = []
    for step, path in ckpts:
        model = load_model(path)
        rec = model.nvfp4_state.recipe
        for bi, batch in enumerate(data):
            u = {"checkpoint": step, "batch": bi}
            for tag, off in (("2d", False), ("1d", True)):
                roles = role_table(rec.replace(disable_2d_quantization=off))
                with _probed(model, roles, "exact", None):
                    ref = _grad_vector(model, batch)
                with _probed(model, roles, "recipe", _gen(seed * 7919 + step * 31 + bi)):
                    est = _grad_vector(model, batch)
                u[f"cos_{tag}"], u[f"relerr_{tag}"] = _cos(est, ref), _rel(est, ref)
                # the same, with SR off: Dgrad's weight mismatch alone, without SR's noise
                rn = role_table(rec.replace(disable_2d_quantization=off, disable_stochastic_rounding=True))
                with _probed(model, rn, "recipe", None):
                    est = _grad_vector(model, batch)
                u[f"cos_rn_{tag}"], u[f"relerr_rn_{tag}"] = _cos(est, ref), _rel(est, ref)
            units.append(u)
            log(
                f"consistency: checkpoint {step} batch {bi}: rel. error 2D {u['relerr_2d']:.4f} 1D {u['relerr_1d']:.4f}"
                f" (RN: {u['relerr_rn_2d']:.4f} / {u['relerr_rn_1d']:.4f})"
            )
    unit_txt = f"checkpoint x batch ({len(ckpts)} x {batches})"
    rows = [
        t_row(
            [u["relerr_1d"] - u["relerr_2d"] for u in units],
            test="gradient rel. error vs its forward's exact gradient, 1D minus 2D (recipe, SR)",
            unit=unit_txt,
        ),
        t_row(
            [u["cos_2d"] - u["cos_1d"] for u in units], test="gradient cosine, 2D minus 1D (recipe, SR)", unit=unit_txt
        ),
        t_row(
            [u["relerr_rn_1d"] - u["relerr_rn_2d"] for u in units],
            test="gradient rel. error, 1D minus 2D (nearest rounding)",
            unit=unit_txt,
        ),
    ]
    tables = [{"title": "2D scaling: gradient consistency", "unit": unit_txt, "rows": rows}]
    train = []
    if steps > 0 and seeds > 0:
        step0, path = ckpts[-2] if len(ckpts) > 1 else ckpts[-1]
        lrs = _lr_schedule(run_dir, step0, steps)
        tb = load_batches(run_dir, steps, batch_size, split="train", offset=step0 % 50)
        ev = load_batches(run_dir, 8, batch_size)
        base = load_model(path)
        for s in range(seeds):
            row = {"seed": s}
            for tag, off in (("2d", False), ("1d", True)):
                import hf_nvfp4

                m = copy.deepcopy(base)
                hf_nvfp4.set_recipe(m, m.nvfp4_state.recipe.replace(disable_2d_quantization=off, seed=s))
                order = torch.randperm(steps, generator=_gen(1000 + s)).tolist()
                _train_steps(m, [tb[i] for i in order], lrs, seed=s)
                row[f"loss_{tag}"] = sum(_eval_losses(m, ev)) / len(ev)
            train.append(row)
            log(f"consistency: seed {s}: eval loss after {steps} steps 2D {row['loss_2d']:.4f} 1D {row['loss_1d']:.4f}")
        tables.append(
            {
                "title": f"2D scaling: {steps} paired steps from checkpoint {step0}",
                "unit": f"training seed ({seeds}), one checkpoint",
                "rows": [
                    t_row(
                        [r["loss_1d"] - r["loss_2d"] for r in train],
                        test=f"eval loss after {steps} steps, 1D minus 2D",
                        unit=f"training seed ({seeds}), one checkpoint",
                    )
                ],
            }
        )
    return {
        "experiment": "consistency",
        "config": {
            "run_dir": str(run_dir),
            "checkpoints": [c[0] for c in ckpts],
            "batches": batches,
            "batch_size": batch_size,
            "steps": steps,
            "seeds": seeds,
            "seed": seed,
            "reference": "straight-through gradient of the same quantized forward (fp32 backward GEMMs "
            "with the forward's quantized W and x)",
            "training": "plain AdamW (fresh moments) at the run's scheduled learning rates; the same "
            "batches in a seed-chosen order for both arms",
        },
        "tables": tables,
        "units": units,
        "train": train,
    }


def _plot_consistency(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    us = res["units"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    ax.scatter([u["relerr_2d"] for u in us], [u["relerr_1d"] for u in us], label="recipe (SR)")
    ax.scatter([u["relerr_rn_2d"] for u in us], [u["relerr_rn_1d"] for u in us], label="nearest rounding")
    lo = min(min(u["relerr_rn_2d"], u["relerr_2d"]) for u in us) * 0.95
    hi = max(max(u["relerr_1d"], u["relerr_rn_1d"]) for u in us) * 1.05
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.5)
    ax.set_xlabel("gradient rel. error, 2D")
    ax.set_ylabel("1D")
    ax.legend(fontsize=8)
    ax.set_title("per checkpoint x batch")
    ax = axes[1]
    if res["train"]:
        for r in res["train"]:
            ax.plot([0, 1], [r["loss_2d"], r["loss_1d"]], "o-", color="C0", alpha=0.7)
        ax.set_xticks([0, 1], ["2D", "1D"])
        ax.set_ylabel("eval loss after the paired steps")
        ax.set_title("paired by seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 4: BF16 blocks, depth profile -----------------------------------------------------------------------------
def depth(
    run_dir,
    *,
    checkpoints: str | None = None,
    n_checkpoints: int = 2,
    batches: int = 25,
    batch_size: int = 4,
    grad_batches: int = 2,
    log=print,
) -> dict:
    """One block at a time in NVFP4, the rest BF16: loss increase and gradient cosine per block."""
    from ..nn.convert import convert_model, find_blocks, unconvert_model

    ckpts = _pick(run_checkpoints(run_dir), checkpoints, n_checkpoints)
    data = load_batches(run_dir, batches, batch_size)
    units = []
    n_blocks = None
    for step, path in ckpts:
        plain = unconvert_model(load_model(path))
        rec = as_recipe(json.loads((Path(run_dir) / "recipe.json").read_text()).get("nvfp4"))
        prefix, blocks = find_blocks(plain)
        n_blocks = len(blocks)
        base = _eval_losses(plain, data)
        gbase = [_grad_vector(plain, b) for b in data[:grad_batches]]
        for i in range(n_blocks):
            keep = [f"{prefix}.{j}" for j in range(n_blocks) if j != i]
            m = convert_model(
                copy.deepcopy(plain), rec.replace(bf16_first_blocks=0, bf16_last_blocks=0, modules_to_not_convert=keep)
            )
            losses = _eval_losses(m, data)
            cos = [_cos(_grad_vector(m, b), g) for b, g in zip(data[:grad_batches], gbase, strict=True)]
            for bi, (lq, lb) in enumerate(zip(losses, base, strict=True)):
                units.append({"checkpoint": step, "batch": bi, "block": i, "dloss": lq - lb})
            units.append({"checkpoint": step, "block": i, "grad_cos": cos})
            log(
                f"depth: checkpoint {step} block {i}: loss +{sum(losses) / len(losses) - sum(base) / len(base):.5f}, "
                f"grad cos {sum(cos) / len(cos):.5f}"
            )
    unit_txt = f"checkpoint x eval batch ({len(ckpts)} x {batches})"
    rows = []
    for i in range(n_blocks):
        rows.append(
            t_row(
                [u["dloss"] for u in units if u.get("block") == i and "dloss" in u],
                test=f"block {i} alone in NVFP4: loss minus BF16 loss",
                unit=unit_txt,
            )
        )
    last = n_blocks - 1
    for i in range(n_blocks - 1):
        a = {(u["checkpoint"], u["batch"]): u["dloss"] for u in units if u.get("block") == last and "dloss" in u}
        d = [a[(u["checkpoint"], u["batch"])] - u["dloss"] for u in units if u.get("block") == i and "dloss" in u]
        rows.append(t_row(d, test=f"loss increase: last block {last} minus block {i}", unit=unit_txt))
    cos = [
        {"block": i, "grad_cos": [c for u in units if u.get("block") == i and "grad_cos" in u for c in u["grad_cos"]]}
        for i in range(n_blocks)
    ]
    return {
        "experiment": "depth",
        "config": {
            "run_dir": str(run_dir),
            "checkpoints": [c[0] for c in ckpts],
            "batches": batches,
            "batch_size": batch_size,
            "grad_batches": grad_batches,
            "n_blocks": n_blocks,
            "split": "eval",
        },
        "tables": [{"title": "Depth profile: one block in NVFP4, the rest BF16", "unit": unit_txt, "rows": rows}],
        "grad_cos": cos,
        "units": units,
    }


def _plot_depth(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["tables"][0]["rows"] if r["test"].endswith("BF16 loss")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = list(range(len(rows)))
    axes[0].errorbar(
        xs,
        [r["mean"] for r in rows],
        yerr=[[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]],
        fmt="o",
        capsize=3,
    )
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_xlabel("block quantized (alone)")
    axes[0].set_ylabel("eval loss minus BF16 (95% CI, unadjusted)")
    axes[1].plot(xs, [1 - sum(c["grad_cos"]) / len(c["grad_cos"]) for c in res["grad_cos"]], "o-")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("block quantized (alone)")
    axes[1].set_ylabel("1 - gradient cosine vs BF16")
    fig.suptitle("Depth profile")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 5: late switch ----------------------------------------------------------------------------------------------
ARMS = ("keep", "all", "forward", "backward")


def late_switch(
    run_dir,
    *,
    checkpoints: str | None = None,
    n_checkpoints: int = 5,
    batches: int = 20,
    batch_size: int = 4,
    at: float = 0.82,
    seeds: int = 8,
    steps: int | None = None,
    log=print,
) -> dict:
    """Delta(t) across checkpoints, then the four branches from the checkpoint nearest ``at`` of training."""
    import hf_nvfp4

    all_ckpts = run_checkpoints(run_dir)
    ckpts = _pick(all_ckpts, checkpoints, n_checkpoints)
    data = load_batches(run_dir, batches, batch_size)
    units, rows = [], []
    for step, path in ckpts:
        model = load_model(path)
        lq = _eval_losses(model, data)
        hf_nvfp4.set_precision(model, "bf16", scope="forward")
        lb = _eval_losses(model, data)
        d = [a - b for a, b in zip(lq, lb, strict=True)]
        units += [{"checkpoint": step, "batch": i, "delta": x} for i, x in enumerate(d)]
        rows.append(
            t_row(
                d,
                test=f"Delta at step {step}: loss NVFP4 forward minus BF16 forward",
                unit=f"eval batch ({batches}), one checkpoint",
                step=step,
            )
        )
        log(f"late_switch: step {step}: Delta {rows[-1]['mean']:+.5f}")
    tables = [{"title": "Delta(t) across checkpoints", "unit": "eval batch, per checkpoint", "rows": rows}]
    total = max_steps(run_dir)
    start_step, start = min(all_ckpts, key=lambda c: abs(c[0] - at * total))
    n = (total - start_step) if steps is None else steps
    branch = []
    if seeds > 0 and n > 0:
        lrs = _lr_schedule(run_dir, start_step, n)
        tb = load_batches(run_dir, n, batch_size, split="train", offset=start_step % 50)
        base = load_model(start)
        for s in range(seeds):  # seeds 0..seeds-1, fixed before the run
            row = {"seed": s}
            order = torch.randperm(n, generator=_gen(2000 + s)).tolist()
            for arm in ARMS:
                m = copy.deepcopy(base)
                hf_nvfp4.set_recipe(m, m.nvfp4_state.recipe.replace(seed=s))
                if arm != "keep":
                    hf_nvfp4.set_precision(m, "bf16", scope=arm)
                _train_steps(m, [tb[i] for i in order], lrs, seed=s)
                hf_nvfp4.set_precision(m, "bf16", scope="all")  # evaluate every arm alike, in BF16
                row[f"loss_{arm}"] = sum(_eval_losses(m, data)) / len(data)
            branch.append(row)
            log(f"late_switch: seed {s}: " + " ".join(f"{a} {row['loss_' + a]:.4f}" for a in ARMS))
        unit = f"training seed ({seeds}), branches from checkpoint {start_step}"
        tables.append(
            {
                "title": f"Late switch from step {start_step} of {total} ({n} steps)",
                "unit": unit,
                "rows": [
                    t_row(
                        [r[f"loss_{a}"] - r["loss_keep"] for r in branch],
                        test=f"eval loss (BF16 eval), switch {a} minus keep NVFP4",
                        unit=unit,
                    )
                    for a in ARMS[1:]
                ],
            }
        )
    return {
        "experiment": "late_switch",
        "config": {
            "run_dir": str(run_dir),
            "checkpoints": [c[0] for c in ckpts],
            "batches": batches,
            "batch_size": batch_size,
            "at": at,
            "branch_step": start_step,
            "branch_steps": n,
            "seeds": list(range(seeds)),
            "max_steps": total,
            "training": "plain AdamW (fresh moments) at the run's scheduled learning rates; every arm "
            "sees the same batches in a seed-chosen order",
        },
        "tables": tables,
        "units": units,
        "branch": branch,
    }


def _plot_late_switch(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["tables"][0]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].errorbar(
        [r["step"] for r in rows],
        [r["mean"] for r in rows],
        yerr=[[r["mean"] - r["lo"] for r in rows], [r["hi"] - r["mean"] for r in rows]],
        fmt="o-",
        capsize=3,
    )
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].axvline(res["config"]["max_steps"] * res["config"]["at"], color="C3", ls="--", lw=0.7)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("Delta = loss NVFP4 fwd - BF16 fwd")
    if res["branch"]:
        for r in res["branch"]:
            axes[1].plot(range(len(ARMS)), [r[f"loss_{a}"] - r["loss_keep"] for a in ARMS], "o-", alpha=0.5)
        axes[1].set_xticks(range(len(ARMS)), ARMS)
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].set_ylabel("eval loss minus keep (per seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- running and writing ---------------------------------------------------------------------------------------
RUNNERS = {
    "sr_accumulation": (sr_accumulation, _plot_sr_accumulation),
    "rht": (rht, _plot_rht),
    "consistency": (consistency, _plot_consistency),
    "depth": (depth, _plot_depth),
    "late_switch": (late_switch, _plot_late_switch),
}


def _flat_rows(res) -> list[dict]:
    out = []
    for t in res["tables"]:
        for r in t["rows"]:
            out.append({"experiment": res["experiment"], "table": t["title"], **r})
    return out


def write_experiment(res: dict, out_dir) -> list[Path]:
    """``NAME.json``, ``NAME.csv`` (one row per test) and ``NAME.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = res["experiment"]
    paths = [out / f"mechanisms_{name}.json", out / f"mechanisms_{name}.csv", out / f"mechanisms_{name}.png"]
    paths[0].write_text(json.dumps(res, indent=1, default=str))
    rows = _flat_rows(res)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with paths[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    RUNNERS[name][1](res, paths[2])
    return paths


def run_experiment(name: str, run_dir, out_dir, log=print, **kw) -> tuple[dict, list[Path]]:
    if name not in RUNNERS:
        raise ValueError(f"unknown experiment {name!r}; choose from {list(RUNNERS)}")
    import inspect

    known = [k for k in inspect.signature(RUNNERS[name][0]).parameters if k not in ("run_dir", "log")]
    unknown = sorted(set(kw) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; this experiment takes {known}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    res = RUNNERS[name][0](run_dir, log=log, **kw)
    res["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    res["config"]["threads"] = torch.get_num_threads()
    return res, write_experiment(res, out_dir)


# -- the page --------------------------------------------------------------------------------------------------
def _num(v, d=4):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:+.{d}f}" if isinstance(v, float) else str(v)


def _p(v):
    return "-" if v is None or v != v else (f"{v:.1e}" if v < 1e-3 else f"{v:.3f}")


def page_tables(results: list[dict], method: str = "holm") -> tuple[list[dict], int]:
    tables = [t for r in results for t in r["tables"]]
    return tables, correct(tables, method)


def markdown_tables(results: list[dict], method: str = "holm") -> str:
    """Every experiment's tables, corrected together (``method``) across the page."""
    tables, m = page_tables(results, method)
    name = {"holm": "Holm", "bh": "Benjamini-Hochberg"}[method]
    lines = [
        f"All {m} tests below are corrected together ({name}, family-wise 5%). "
        '"resolved" = the adjusted p-value is below 0.05; intervals are unadjusted Student-t 95%.',
        "",
    ]
    for res in results:
        c = res["config"]
        lines += [
            f"### {res['experiment']}",
            "",
            f"Checkpoints {c.get('checkpoints')}; {c.get('seconds', '?')} s on {c.get('threads', '?')} threads.",
            "",
        ]
        for t in res["tables"]:
            lines += [
                f"**{t['title']}** (replication unit: {t['unit']})",
                "",
                "| test | mean [95% CI] | n | p | p adj. | resolved |",
                "|---|---|---|---|---|---|",
            ]
            for r in t["rows"]:
                lines.append(
                    f"| {r['test']} | {_num(r['mean'])} [{_num(r['lo'])}, {_num(r['hi'])}] | {r['n']} | "
                    f"{_p(r['p'])} | {_p(r['p_adj'])} | "
                    f"{'yes' if r['resolved'] else 'no' if r['resolved'] is not None else '-'} |"
                )
            lines.append("")
    return "\n".join(lines)


__all__ = [
    "EXPERIMENTS",
    "consistency",
    "depth",
    "fake_sr_scale_up",
    "late_switch",
    "markdown_tables",
    "rht",
    "run_experiment",
    "sr_accumulation",
    "write_experiment",
]


def write_page(out_dir, page=None, method: str = "holm") -> Path:
    """Rewrite the generated block of ``page`` (default ``OUT_DIR/mechanisms.md``) from every
    ``mechanisms_*.json`` in ``out_dir``, all tests corrected together."""
    from ..generated import markers, write_generated

    out = Path(out_dir)
    results = [
        json.loads((out / f"mechanisms_{n}.json").read_text())
        for n in EXPERIMENTS
        if (out / f"mechanisms_{n}.json").is_file()
    ]
    if not results:
        raise FileNotFoundError(f"{out}: no mechanisms_*.json to build a page from")
    path = Path(page) if page else out / "mechanisms.md"
    if not path.is_file():
        b, e = markers("mechanisms")
        path.write_text(f"# Mechanism experiments\n\n{b}\n{e}\n")
    write_generated(path, markdown_tables(results, method), "mechanisms")
    return path
