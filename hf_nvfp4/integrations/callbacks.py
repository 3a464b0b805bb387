"""Trainer callbacks: the late switch to higher precision and loss parity against a shadow run.

Both log through ``trainer.log`` (values added to ``logs`` inside ``on_log`` would reach the
console only), so their figures land in ``log_history``/trainer_state.json and every
``report_to`` integration. Callbacks are not handed the Trainer; they find it once, on the
call stack of ``on_train_begin`` (or take it from :meth:`bind`).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..config import PRECISIONS
from ..nn.convert import set_precision
from ..nn.linear import NVFP4Linear
from ..recipe import Recipe

logger = logging.getLogger("hf_nvfp4")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
RNG_FILE = "nvfp4_sr_rng.pt"
SHADOW_FILE = "nvfp4_shadow.pt"


def parse_tokens(text: str | int | float) -> int:
    """``"8.2T"`` -> 8_200_000_000_000; plain numbers pass through."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*(tokens)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a token count; write e.g. '8.2T', '500M' or 123456")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).upper()]))


class _TrainerBound(TrainerCallback):
    trainer = None

    def bind(self, trainer):
        """Tell the callback its Trainer (otherwise found on the stack at train begin)."""
        self.trainer = trainer
        return self

    def _find_trainer(self):
        if self.trainer is not None:
            return self.trainer
        from transformers import Trainer

        for frame in inspect.stack()[1:40]:
            cand = frame.frame.f_locals.get("self")
            if isinstance(cand, Trainer) and self in cand.callback_handler.callbacks:
                self.trainer = cand
                return cand
        raise RuntimeError(f"{type(self).__name__}: could not find its Trainer; call .bind(trainer)")


def _sr_state_path(ckpt: str) -> Path:
    return Path(ckpt) / RNG_FILE


class PrecisionSwitchCallback(_TrainerBound):
    """Switch every NVFP4Linear to ``to`` (BF16) late in training: the paper's last-18% switch.

    switch_at: a fraction of max_steps (float in (0, 1)), an absolute step (int), or a token
        count (``"8.2T"``; or pass ``tokens=``). Tokens are converted to a step with
        ``tokens_per_step`` (or, if not given, the batch size x sequence length x accumulation
        x world size seen in the first batch).
    scope: "all" (all three GEMMs) or "forward" (Fprop only, the cheap variant).

    Logs ``precision_switch_step`` once. Correct after resuming on either side of the switch.
    It also saves and restores the stochastic-rounding stream with each checkpoint.

    >>> from hf_nvfp4 import PrecisionSwitchCallback
    >>> cb = PrecisionSwitchCallback(0.82)            # the last 18% of steps in BF16
    >>> cb2 = PrecisionSwitchCallback(tokens="8.2T", tokens_per_step=2**22)
    """

    def __init__(
        self, switch_at=None, to: str = "bf16", scope: str = "all", *, tokens=None, tokens_per_step: int | None = None
    ):
        if (switch_at is None) == (tokens is None):
            raise ValueError("PrecisionSwitchCallback: give exactly one of switch_at or tokens=")
        if to not in PRECISIONS:
            raise ValueError(f"PrecisionSwitchCallback: to must be one of {PRECISIONS}, got {to!r}")
        if scope not in ("all", "forward"):
            raise ValueError(f"PrecisionSwitchCallback: scope must be 'all' or 'forward', got {scope!r}")
        self.to, self.scope, self.tokens_per_step = to, scope, tokens_per_step
        self.fraction = self.step = self.tokens = None
        if tokens is not None or isinstance(switch_at, str):
            self.tokens = parse_tokens(tokens if tokens is not None else switch_at)
        elif isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)):
            raise ValueError(
                f"PrecisionSwitchCallback: switch_at must be a fraction, a step or a token count, got {switch_at!r}"
            )
        elif isinstance(switch_at, float):
            if not 0.0 < switch_at < 1.0:
                raise ValueError(f"PrecisionSwitchCallback: a fractional switch_at must be in (0, 1), got {switch_at}")
            self.fraction = switch_at
        else:
            if switch_at < 0:
                raise ValueError(f"PrecisionSwitchCallback: switch_at step must be >= 0, got {switch_at}")
            self.step = int(switch_at)
        self.switch_step: int | None = None
        self.switched = False

    def _resolve(self, args, state) -> int | None:
        if self.fraction is not None:
            return int(round(self.fraction * state.max_steps))
        if self.step is not None:
            return self.step
        if self.tokens_per_step:
            return int(math.ceil(self.tokens / self.tokens_per_step))
        return None  # from the first batch

    def _apply(self, model):
        n = set_precision(model, self.to, scope=self.scope)
        self.switched = True
        logger.info("hf_nvfp4: switched %d NVFP4Linear layers to %s (scope=%s)", n, self.to, self.scope)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        trainer = self._find_trainer()
        self.switch_step = self._resolve(args, state)
        _restore_sr_state(model, args, state)
        if self.tokens is not None and self.switch_step is None:
            self._hook = model.register_forward_pre_hook(self._measure, with_kwargs=True)
        if self.switch_step is not None and state.global_step >= self.switch_step and not self.switched:
            self._apply(model)  # resumed after the switch
        self._trainer = trainer

    def _measure(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not module.training:
            return
        tr = self.trainer
        world = tr.args.world_size if tr is not None else 1
        accum = tr.args.gradient_accumulation_steps if tr is not None else 1
        self.tokens_per_step = ids.numel() * world * accum
        self.switch_step = int(math.ceil(self.tokens / self.tokens_per_step))
        self._hook.remove()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.switch_step is not None and not self.switched and state.global_step >= self.switch_step:
            self._apply(model)
            # Logged with the next log: a trainer.log from on_step_end would cancel this
            # step's own loss log (the callback handler resets should_log in on_log).
            self._pending = float(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            self.trainer.log({"precision_switch_step": pending})

    def on_train_end(self, args, state, control, **kwargs):
        self.on_log(args, state, control)

    def on_save(self, args, state, control, model=None, **kwargs):
        _save_sr_state(model, args, state)


def _checkpoint_dir(args, state) -> Path:
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


def _save_sr_state(model, args, state) -> None:
    st = getattr(_unwrap(model), "nvfp4_state", None)
    if st is not None:  # every process saves its own stream (rank-suffixed file)
        d = _checkpoint_dir(args, state)
        d.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        torch.save(st.state_dict(), d / (RNG_FILE if rank == 0 else f"{RNG_FILE}.{rank}"))


def _restore_sr_state(model, args, state) -> None:
    st = getattr(_unwrap(model), "nvfp4_state", None)
    if st is None or state.global_step == 0:
        return
    rank = int(os.environ.get("RANK", "0"))
    f = _checkpoint_dir(args, state) / (RNG_FILE if rank == 0 else f"{RNG_FILE}.{rank}")
    if f.exists():
        st.load_state_dict(torch.load(f, weights_only=False))


def _unwrap(model):
    return getattr(model, "module", model)


class SRStateCallback(TrainerCallback):
    """Saves and restores the stochastic-rounding stream with each checkpoint (added by default)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        _restore_sr_state(model, args, state)

    def on_save(self, args, state, control, model=None, **kwargs):
        _save_sr_state(model, args, state)


def callbacks_from_recipe(recipe: Recipe) -> list:
    """The callbacks a recipe asks for (always the SR-stream saver for converted models)."""
    cbs: list = []
    ps = recipe.precision_switch
    if ps.at is not None:
        cbs.append(PrecisionSwitchCallback(ps.at, to=ps.to, scope=ps.scope))
    elif recipe.nvfp4 is not None:
        cbs.append(SRStateCallback())
    sh = recipe.fp8_shadow
    if sh.enabled:
        from .shadow import FP8ShadowCallback

        cbs.append(FP8ShadowCallback(sh.mode, format=sh.format, reference=sh.reference))
    if recipe.logging.health_every_n_steps and recipe.nvfp4 is not None:
        cbs.append(QuantHealthCallback(recipe.logging.health_every_n_steps))
    ev = recipe.evaluation
    if ev.tasks:
        from .lm_eval import LMEvalCallback

        cbs.append(
            LMEvalCallback(
                ev.tasks,
                ev.every_n_steps or None,
                on_evaluate=not ev.every_n_steps,
                include_path=ev.include_path,
                limit=ev.limit,
                batch_size=ev.batch_size,
            )
        )
    return cbs


def weight_health(model) -> dict[str, float]:
    """Quantization health of every NVFP4 layer's weight, as the recipe quantizes it (16x16 tiles).

    underflow: share of non-zero weights that quantize to zero; saturated: share of elements
    whose scaled magnitude exceeds 6 and is clamped (the E4M3 block scale rounded down).
    Returns the mean and max over layers.
    """
    from ..formats.nvfp4 import TENSOR_SCALE, quantize_nvfp4

    under, sat = [], []
    with torch.no_grad():
        for m in _unwrap(model).modules():
            if not isinstance(m, NVFP4Linear) or m.precision != "nvfp4" or m.weight.is_meta:
                continue
            w = m.weight.detach().float()
            tile = (1, 16) if m.nvfp4_state.config.disable_2d_quantization else (16, 16)
            q = quantize_nvfp4(w, tile=tile)
            nz = w != 0
            under.append(float(((q.dequantize() == 0) & nz).sum() / nz.sum().clamp(min=1)))
            # the largest magnitude a block can hold is 6 * scale * amax / 2688
            limit = (6.0 * q.scale.float() * (q.amax / TENSOR_SCALE)).repeat_interleave(16, dim=1)
            sat.append(float((w.abs() > limit[:, : w.shape[1]] * (1 + 1e-6)).float().mean()))
    if not under:
        return {}
    return {
        "nvfp4_health/weight_underflow_mean": sum(under) / len(under),
        "nvfp4_health/weight_underflow_max": max(under),
        "nvfp4_health/weight_saturated_mean": sum(sat) / len(sat),
        "nvfp4_health/weight_saturated_max": max(sat),
    }


class QuantHealthCallback(_TrainerBound):
    """Low-rate quantization health statistics of the weights, logged every ``every_n_steps``.

    >>> from hf_nvfp4.integrations.callbacks import QuantHealthCallback
    >>> cb = QuantHealthCallback(every_n_steps=200)
    """

    def __init__(self, every_n_steps: int = 100):
        if every_n_steps < 1:
            raise ValueError(f"QuantHealthCallback: every_n_steps must be >= 1, got {every_n_steps}")
        self.every = every_n_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            stats = weight_health(model)
            if stats:
                tr = self._find_trainer()
                should = control.should_log  # trainer.log resets it; keep this step's own log
                tr.log(stats)
                control.should_log = should


__all__ = ["PrecisionSwitchCallback", "QuantHealthCallback", "SRStateCallback", "parse_tokens", "weight_health"]
