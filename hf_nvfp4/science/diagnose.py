"""Recipe diagnostics: each part of the recipe measured on the real tensors of a real batch.

:func:`diagnose` runs one forward and backward of the model on a batch, captures every target
Linear's input ``x`` and output gradient ``dy`` (hooks), and replays the layer's three GEMMs
(Fprop ``y = x W^T``, Dgrad ``dx = dy W``, Wgrad ``dW = dy^T x``) with the quantizers of
:mod:`hf_nvfp4.formats`, against the exact product of the same operands:

- relative error of each GEMM as the recipe computes it (and of plain BF16 operands, the floor);
- gradient bias of Dgrad and Wgrad with and without stochastic rounding (SR): the mean over
  ``draws`` independent SR draws against the GEMM with the exact gradient operand, with a
  jackknife t-interval over draws (nearest rounding is deterministic: its bias is exact);
- Wgrad error with and without the random Hadamard transform (RHT), and the Wgrad operands'
  outlier statistics (row kurtosis, block max/rms) before and after it;
- forward/backward weight mismatch (the W Fprop sees vs the W Dgrad sees) with and without 2D
  scaling, and each one's weight quantization error;
- underflow (non-zero -> 0) and saturation (clamped to the block's largest value) rates of the
  activations, weights and gradients as quantized.

Layers: every converted Linear, and every other Linear inside the transformer blocks (the BF16
blocks too, diagnosed with the model's recipe as if converted: the paper's argument for keeping
the last blocks in BF16 is that they suffer most). The model's RNG state, gradients and mode are
restored and no parameter's ``.grad`` is touched, so it can run inside training
(:class:`DiagnoseCallback`).

>>> import torch, hf_nvfp4
>>> m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
>>> rep = hf_nvfp4.diagnose(m, torch.randn(64, 32), loss_fn=lambda y: y.square().mean(), draws=4)
>>> sorted(r["name"] for r in rep["layers"]), rep["layers"][0]["fprop_relerr"] > 0
(['0', '2'], True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GEMMS, PAPER_RHT_GEMMS, PAPER_STOCHASTIC_ROLES, NVFP4Recipe, as_recipe
from ..formats.e2m1 import E2M1_VALUES
from ..formats.registry import _rht, get_format
from ..integrations._trainer import TrainerBound, unwrap
from ..nn.convert import find_blocks, plan_conversion
from ..nn.linear import NVFP4Linear
from ..ops.linear import _square
from ..ops.roles import role_table
from .stats import paired_summary, t_quantile

TENSORS = {"act": "fprop_input", "weight": "fprop_weight", "grad": "dgrad_grad_output",
           "wgrad_grad": "wgrad_grad_output", "wgrad_act": "wgrad_input"}


# -- quantized operands and GEMMs (fp32, in each operand's GEMM basis) --------------------------------
def _basis(t: torch.Tensor, spec) -> torch.Tensor:
    """``t`` padded and Hadamard-transformed along its last dim if ``spec.rht``: the exact operand."""
    if not spec.rht:
        return t
    tile = get_format(spec.format).act_tile
    return _rht(t, spec.rht_size, tile[1] if tile else 1)  # the registry's own basis


def _q(t: torch.Tensor, spec, gen=None) -> torch.Tensor:
    """The dequantized GEMM operand as ``spec`` quantizes it."""
    fmt = get_format(spec.format)
    if not fmt.quantizes:
        return t
    return fmt.fake_quantize(_basis(t, spec), tile=spec.tile, stochastic=spec.stochastic,
                             generator=gen if spec.stochastic else None)


def _dgrad_weight(w: torch.Tensor, roles, gen=None) -> torch.Tensor:
    """The W Dgrad multiplies (dx = dy @ this), as the training op builds it."""
    spec = roles["dgrad_weight"]
    if _square(spec.tile) or not get_format(spec.format).quantizes:  # the training op's own test
        return _q(w, spec, gen)  # a square 2D tile is the same quantized W, transposed
    return _q(w.t(), spec, gen).t()  # blocks along N


def _fwd_weight(w, roles, gen=None):
    return _q(w, roles["fprop_weight"], gen)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp(min=1e-30))


def _bf16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


def _generators(seed: int, n: int) -> list[torch.Generator]:
    gens = []
    for k in range(n):
        g = torch.Generator()
        g.manual_seed(seed * 1_000_003 + k)
        gens.append(g)
    return gens


def bias_interval(draws: list[torch.Tensor], ref: torch.Tensor, level: float = 0.95) -> tuple[float, float, float]:
    """Relative bias ``||E[draw] - ref|| / ||ref||`` of a random estimator from independent draws.

    The U-statistic mean over pairs k != l of <d_k, d_l> (d = draw - ref) is unbiased for
    ||bias||^2, unlike ||mean - ref||^2 which also holds the draws' variance / K; its
    jackknife standard error gives a t-interval (K - 1 degrees of freedom). Returns
    (estimate, lo, hi), each as sqrt(max(0, .)) / ||ref||.
    """
    k = len(draws)
    if k < 3:
        raise ValueError("bias_interval needs at least 3 draws")
    d = torch.stack([(x - ref).reshape(-1).double() for x in draws])
    s = d.sum(0)
    sq = (d * d).sum(1)
    dots = d @ s  # <d_j, S>
    tot, ssq = float(s @ s), float(sq.sum())
    u = (tot - ssq) / (k * (k - 1))
    loo = ((tot - 2 * dots + sq) - (ssq - sq)) / ((k - 1) * (k - 2))
    se = math.sqrt(max(float(((loo - loo.mean()) ** 2).sum()) * (k - 1) / k, 0.0))
    half = t_quantile(0.5 + level / 2, k - 1) * se
    norm2 = float(ref.double().norm()) ** 2 or 1e-300

    def rel(v):
        return math.sqrt(max(v, 0.0) / norm2)

    return rel(u), rel(u - half), rel(u + half)


def outlier_stats(t: torch.Tensor, block: int) -> tuple[float, float]:
    """(mean row kurtosis E[v^4]/E[v^2]^2, mean block max/rms over ``block``-element blocks) along the last dim."""
    t = t.float()
    pad = (-t.shape[-1]) % block
    t = F.pad(t, (0, pad)) if pad else t
    m2 = t.pow(2).mean(-1)
    ok = m2 > 0
    kurt = float((t.pow(4).mean(-1)[ok] / m2[ok].pow(2)).mean()) if ok.any() else float("nan")
    b = t.reshape(-1, block)
    rms = b.pow(2).mean(-1).sqrt()
    ok = rms > 0
    crest = float((b.abs().amax(-1)[ok] / rms[ok]).mean()) if ok.any() else float("nan")
    return kurt, crest


def _block_limit(q, rows: int, cols: int) -> torch.Tensor:
    """The largest magnitude each element's block can hold, [rows, cols]: the container's own
    dequantization with every element code set to the element format's largest value."""
    if q.data.dtype == torch.uint8:  # two E2M1 codes a byte: the largest positive code in both nibbles
        top = E2M1_VALUES.index(max(E2M1_VALUES))
        full = torch.full_like(q.data, top | top << 4)
    else:  # float8 elements
        full = torch.full_like(q.data, torch.finfo(q.data.dtype).max)
    lim = dataclasses.replace(q, data=full).dequantize(torch.float32)
    return lim.reshape(-1, lim.shape[-1])[:rows, :cols]


def quant_health(t: torch.Tensor, spec) -> tuple[float, float]:
    """(underflow, saturation) of ``t`` as ``spec`` quantizes it (nearest rounding, in its GEMM basis).

    underflow: share of non-zero elements that quantize to 0; saturation: share of elements
    larger than their block can represent (clamped).
    """
    fmt = get_format(spec.format)
    if not fmt.quantizes:
        return 0.0, 0.0
    tb = _basis(t, spec)
    deq = fmt.fake_quantize(tb, tile=spec.tile)
    nz = tb != 0
    under = float(((deq == 0) & nz).sum() / nz.sum().clamp(min=1))
    q = fmt.quantize(tb, tile=spec.tile)
    lim = _block_limit(q, *tb.shape)
    sat = float((tb.abs() > lim * (1 + 1e-6)).float().mean())
    return under, sat


# -- one layer ---------------------------------------------------------------------------------------
def _safe_roles(recipe: NVFP4Recipe, **changes):
    """The role table of ``recipe`` with ``changes``, or None where the format cannot honour them."""
    try:
        return role_table(recipe.replace(**changes))
    except ValueError:
        return None


def layer_metrics(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor, recipe: NVFP4Recipe, draws: int = 16,
                  seed: int = 0) -> dict:
    """Every diagnostic of one Linear from its captured input ``x`` [M, K], weight ``w`` [N, K] and
    output gradient ``dy`` [M, N] (all fp32), for the recipe's format."""
    fmt = get_format(recipe.format)
    x, w, dy = x.float(), w.float(), dy.float()
    nan = float("nan")
    out: dict = {}
    roles = role_table(recipe)
    refs = {"fprop": x @ w.t(), "dgrad": dy @ w, "wgrad": dy.t() @ x}
    gens = _generators(seed, draws)

    def gemm(g, roles, gen=None):
        if g == "fprop":
            return _q(x, roles["fprop_input"], gen) @ _fwd_weight(w, roles, gen).t()
        if g == "dgrad":
            return (_q(dy, roles["dgrad_grad_output"], gen) @ _dgrad_weight(w, roles, gen))[:, : w.shape[1]]
        return _q(dy.t(), roles["wgrad_grad_output"], gen) @ _q(x.t(), roles["wgrad_input"], gen).t()

    for g in GEMMS:  # as configured; averaged over the draws where the recipe rounds stochastically
        used = [r for r in roles if r.startswith(g) or (g == "dgrad" and r == "fprop_weight")]
        random = any(roles[r].stochastic for r in used)
        errs = [_rel(gemm(g, roles, gk), refs[g]) for gk in (gens if random else gens[:1])]
        out[f"{g}_relerr"] = sum(errs) / len(errs)
    out["fprop_relerr_bf16"] = _rel(_bf16(x) @ _bf16(w).t(), refs["fprop"])
    out["dgrad_relerr_bf16"] = _rel(_bf16(dy) @ _bf16(w), refs["dgrad"])
    out["wgrad_relerr_bf16"] = _rel(_bf16(dy).t() @ _bf16(x), refs["wgrad"])

    # the mechanisms, each measured at the paper's placement with only its own switch flipped
    mech = recipe.replace(rht_gemms=PAPER_RHT_GEMMS, stochastic_roles=PAPER_STOCHASTIC_ROLES)
    sr_on = _safe_roles(mech, disable_stochastic_rounding=False)
    sr_off = role_table(mech.replace(disable_stochastic_rounding=True))
    for g, role in (("dgrad", "dgrad_grad_output"), ("wgrad", "wgrad_grad_output")):
        src = dy if g == "dgrad" else dy.t()  # the gradient operand, blocks along the GEMM's inner dim
        other = _dgrad_weight(w, sr_off) if g == "dgrad" else _q(x.t(), sr_off["wgrad_input"]).t()
        exact = _basis(src, sr_off[role]) @ other
        out[f"{g}_bias_rn"] = _rel(_q(src, sr_off[role]) @ other, exact)
        if sr_on is None or not fmt.stochastic:
            out[f"{g}_bias_sr"] = out[f"{g}_bias_sr_lo"] = out[f"{g}_bias_sr_hi"] = nan
        else:
            b, lo, hi = bias_interval([_q(src, sr_on[role], gk) @ other for gk in gens], exact)
            out[f"{g}_bias_sr"], out[f"{g}_bias_sr_lo"], out[f"{g}_bias_sr_hi"] = b, lo, hi

    rht_on = _safe_roles(mech, disable_rht=False)
    rht_off = role_table(mech.replace(disable_rht=True))
    for tag, rs in (("rht", rht_on), ("no_rht", rht_off)):
        if rs is None or not fmt.rht_sizes and tag == "rht":
            out[f"wgrad_relerr_{tag}"] = nan
            continue
        random = rs["wgrad_grad_output"].stochastic
        errs = [_rel(gemm("wgrad", rs, gk), refs["wgrad"]) for gk in (gens if random else gens[:1])]
        out[f"wgrad_relerr_{tag}"] = sum(errs) / len(errs)
    size = mech.rht_size
    for name, t in (("wgrad_grad", dy.t()), ("wgrad_act", x.t())):
        k0, c0 = outlier_stats(t, size)
        k1, c1 = outlier_stats(_rht(t, size, 1), size)
        out[f"{name}_kurtosis"], out[f"{name}_kurtosis_rht"] = k0, k1
        out[f"{name}_crest"], out[f"{name}_crest_rht"] = c0, c1

    for tag, rs in (("2d", _safe_roles(mech, disable_2d_quantization=False)),
                    ("1d", role_table(mech.replace(disable_2d_quantization=True)))):
        if rs is None or tag == "2d" and fmt.weight_tile is None:
            out[f"weight_mismatch_{tag}"] = out[f"weight_err_{tag}"] = nan
            continue
        wf, wb = _fwd_weight(w, rs), _dgrad_weight(w, rs)[: w.shape[0]]
        out[f"weight_mismatch_{tag}"] = float((wf - wb).norm() / w.norm().clamp(min=1e-30))
        out[f"weight_err_{tag}"] = _rel(wf, w)

    tensors = {"act": x, "weight": w, "grad": dy, "wgrad_grad": dy.t(), "wgrad_act": x.t()}
    for name, role in TENSORS.items():
        out[f"{name}_underflow"], out[f"{name}_saturation"] = quant_health(tensors[name], roles[role])
    return out


# -- capture on a real batch ----------------------------------------------------------------------------
def target_layers(model: nn.Module) -> list[tuple[str, nn.Linear, int | None]]:
    """(name, module, block index) of every converted Linear and every Linear the conversion
    plan (:func:`hf_nvfp4.nn.convert.plan_conversion`, with the model's recipe) would convert or
    keeps in a BF16 block; never the LM head, a skipped shape or ``modules_to_not_convert``."""
    _, blocks = find_blocks(model)
    block_of = {}
    for i, b in enumerate(blocks):
        for m in b.modules():
            block_of[id(m)] = i
    st = getattr(model, "nvfp4_state", None)
    plan = plan_conversion(model, st.recipe if st is not None else None)
    return [(name, m, block_of.get(id(m))) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (isinstance(m, NVFP4Linear) or plan.get(name) in ("convert", "bf16 block"))]


def _as_batch(batch, device):
    if isinstance(batch, torch.Tensor):
        return (batch.to(device),), {}
    if isinstance(batch, dict):
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if "input_ids" in kw and "labels" not in kw:
            kw["labels"] = kw["input_ids"]
        return (), kw
    raise TypeError(f"diagnose: batch must be a tensor or a dict of tensors, got {type(batch).__name__}")


def _check_batch(batch, loss_fn) -> None:
    """An empty batch fails here, by name, not deep inside the model's reshapes."""
    what = "diagnose: batch"
    if isinstance(batch, dict):
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise ValueError(f"{what} holds no tensor; give a dict such as {{'input_ids': ids}} ([batch, tokens])")
        for k, v in tensors.items():
            if v.numel() == 0:
                raise ValueError(f"{what}[{k!r}] is empty (shape {tuple(v.shape)}); give at least one sequence")
        ids = tensors.get("input_ids")
        if loss_fn is None and "labels" not in tensors and ids is not None and ids.ndim >= 1 and ids.shape[-1] < 2:
            raise ValueError(
                f"{what}['input_ids'] has {ids.shape[-1]} token per sequence: the loss predicts the next token, "
                "so give at least 2 (or pass labels= / loss_fn=)"
            )
    elif isinstance(batch, torch.Tensor) and batch.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(batch.shape)}); give at least one sequence")


def capture(model: nn.Module, batch, layers, loss_fn=None, max_tokens: int | None = None) -> dict[str, dict]:
    """{layer name: {"x": [M, K], "dy": [M, N]}} from one forward and backward of ``model`` on ``batch``.

    Runs in eval mode (no dropout; training-only hooks such as a shadow run's batch capture and
    the SR re-seeding stay out of it). The gradients are taken with ``torch.autograd.grad`` with
    respect to the layers' outputs, so no parameter's ``.grad`` is touched (nor DDP's gradient
    hooks). The mode and torch's RNG state are restored afterwards.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name):
        def fwd(mod, inp, out):
            inputs[name] = inp[0].detach().reshape(-1, inp[0].shape[-1])
            if out.requires_grad:
                outputs[name] = out
        return fwd

    for name, mod, _ in layers:
        handles.append(mod.register_forward_hook(hook(name)))
    params = list(model.parameters())
    if any(type(p).__name__ == "DTensor" for p in params):
        raise ValueError("diagnose: the model's parameters are sharded (FSDP); run it on an unsharded copy")
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    device = params[0].device if params else torch.device("cpu")
    try:
        model.eval()
        args, kw = _as_batch(batch, device)
        with torch.enable_grad():
            out = model(*args, **kw)
            loss = loss_fn(out) if loss_fn is not None else getattr(out, "loss", None)
            if loss is None:
                raise ValueError("diagnose: the model returned no .loss; pass loss_fn= (output -> scalar loss)")
            names = list(outputs)
            grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True) if names else []
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    store = {}
    for name, g in zip(names, grads, strict=True):
        if g is None:
            continue  # no gradient reaches this layer
        x, dy = inputs[name], g.detach().reshape(-1, g.shape[-1])
        store[name] = {"x": x[:max_tokens], "dy": dy[:max_tokens]} if max_tokens else {"x": x, "dy": dy}
    return store


def diagnose(model: nn.Module, batch, *, recipe=None, draws: int = 16, seed: int = 0, loss_fn=None,
             max_tokens: int | None = 4096, level: float = 0.95) -> dict:
    """Diagnostics of every target Linear of ``model`` on one batch (see the module docstring).

    batch: a dict for ``model(**batch)`` (``labels`` default to ``input_ids``) or a tensor for
    ``model(batch)`` (then give ``loss_fn``). recipe: what to diagnose (default: the model's own,
    else the paper's NVFP4 recipe). draws: independent SR draws per stochastic GEMM (>= 3).
    Returns ``{"layers": [per-layer dict], "summary": {...}, "config": {...}}``.
    """
    if draws < 3:
        raise ValueError(f"diagnose: draws must be >= 3 (the bias interval needs them), got {draws}")
    model = unwrap(model)
    st = getattr(model, "nvfp4_state", None)
    rec = as_recipe(recipe if recipe is not None else st.recipe if st is not None else None)
    layers = target_layers(model)
    if not layers:
        raise ValueError("diagnose: the model has no Linear layer to diagnose (none converted, none in blocks)")
    _check_batch(batch, loss_fn)
    caps = capture(model, batch, layers, loss_fn, max_tokens)
    n_blocks = len(find_blocks(model)[1])
    rows = []
    for i, (name, mod, block) in enumerate(layers):
        if name not in caps:
            continue
        c = caps[name]
        row = {"name": name, "block": block, "converted": isinstance(mod, NVFP4Linear),
               "shape": f"{mod.out_features}x{mod.in_features}", "tokens": int(c["x"].shape[0])}
        with torch.no_grad():
            row.update(layer_metrics(c["x"], mod.weight.detach(), c["dy"], rec, draws, seed + i))
        rows.append(row)
    return {"layers": rows, "summary": summarize(rows, level), "sr_layers": sr_layer_counts(rows),
            "config": {"recipe": rec.to_dict(), "draws": draws, "seed": seed, "n_blocks": n_blocks,
                       "level": level}}


# -- summaries ------------------------------------------------------------------------------------------
MECHANISMS = {  # name: (metric without, metric with, what it shows)
    "sr_dgrad_bias": ("dgrad_bias_rn", "dgrad_bias_sr", "Dgrad gradient bias: nearest rounding minus SR"),
    "sr_wgrad_bias": ("wgrad_bias_rn", "wgrad_bias_sr", "Wgrad gradient bias: nearest rounding minus SR"),
    "rht_wgrad_err": ("wgrad_relerr_no_rht", "wgrad_relerr_rht", "Wgrad relative error: without RHT minus with"),
    "rht_grad_crest": ("wgrad_grad_crest", "wgrad_grad_crest_rht", "dy block max/rms: before RHT minus after"),
    "rht_act_crest": ("wgrad_act_crest", "wgrad_act_crest_rht", "x block max/rms: before RHT minus after"),
    "rht_grad_kurtosis": ("wgrad_grad_kurtosis", "wgrad_grad_kurtosis_rht", "dy row kurtosis: before minus after"),
    "2d_mismatch": ("weight_mismatch_1d", "weight_mismatch_2d", "Fprop/Dgrad weight mismatch: 1D minus 2D"),
    "2d_weight_err": ("weight_err_1d", "weight_err_2d", "weight quantization error: 1D minus 2D (the cost of 2D)"),
}


def summarize(rows: list[dict], level: float = 0.95) -> dict:
    """Per mechanism: the paired difference (without - with) over layers, mean and t-interval."""
    out = {}
    for key, (off, on, what) in MECHANISMS.items():
        diffs = [r[off] - r[on] for r in rows if r.get(off) == r.get(off) and r.get(on) == r.get(on)]
        s = paired_summary(diffs, level)
        s.update(what=what, without=_mean([r.get(off) for r in rows]), with_=_mean([r.get(on) for r in rows]))
        out[key] = s
    return out


def sr_layer_counts(rows: list[dict]) -> dict:
    """Per GEMM, over layers: how many SR-bias intervals contain 0, and how many lie below the nearest-rounding bias."""
    out = {}
    for g in ("dgrad", "wgrad"):
        rs = [r for r in rows if r.get(f"{g}_bias_sr_lo") == r.get(f"{g}_bias_sr_lo")]
        out[g] = {"n": len(rs), "sr_interval_contains_0": sum(r[f"{g}_bias_sr_lo"] == 0.0 for r in rs),
                  "sr_interval_below_rn": sum(r[f"{g}_bias_sr_hi"] < r[f"{g}_bias_rn"] for r in rs)}
    return out


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and x == x]
    return sum(xs) / len(xs) if xs else float("nan")


# -- Trainer callback -----------------------------------------------------------------------------------
class DiagnoseCallback(TrainerBound):
    """Run :func:`diagnose` on the latest training batch every ``every_n_steps`` steps (low rate).

    Logs the per-mechanism means (``nvfp4_diag/...``) and writes the full per-layer report to
    ``<output_dir>/diagnostics/step-<N>.json``. Training is not disturbed: RNG state and mode are
    restored and no ``.grad`` is touched. Each process diagnoses its own batch (rank 0 writes the
    file); FSDP-sharded models are not supported.

    >>> from hf_nvfp4 import DiagnoseCallback
    >>> cb = DiagnoseCallback(every_n_steps=500, draws=8)
    """

    def __init__(self, every_n_steps: int = 500, draws: int = 8, max_tokens: int | None = 2048, recipe=None):
        if every_n_steps < 1:
            raise ValueError(f"DiagnoseCallback: every_n_steps must be >= 1, got {every_n_steps}")
        if draws < 3:
            raise ValueError(f"DiagnoseCallback: draws must be >= 3, got {draws}")
        self.every, self.draws, self.max_tokens, self.recipe = every_n_steps, draws, max_tokens, recipe
        self._batch = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._hook is None and model is not None:
            self._hook = unwrap(model).register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            b = {k: v.detach() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            if args:
                b["input_ids"] = args[0].detach()
            self._batch = b

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or self._batch is None or model is None:
            return
        batch, self._batch = self._batch, None  # diagnose's own forward runs in eval mode: not kept
        rep = diagnose(model, batch, recipe=self.recipe, draws=self.draws, seed=state.global_step,
                       max_tokens=self.max_tokens)
        if int(os.environ.get("RANK", "0")) == 0:
            d = Path(args.output_dir) / "diagnostics"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"step-{state.global_step}.json").write_text(json.dumps(rep, indent=1, default=str))
        logs = {f"nvfp4_diag/{k}": v["mean"] for k, v in rep["summary"].items() if v["mean"] == v["mean"]}
        for g in GEMMS:
            logs[f"nvfp4_diag/{g}_relerr"] = _mean([r[f"{g}_relerr"] for r in rep["layers"] if r["converted"]])
        self.log_metrics(args, state, control, logs)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


__all__ = ["DiagnoseCallback", "bias_interval", "capture", "diagnose", "layer_metrics", "outlier_stats",
           "quant_health", "target_layers"]
