"""Trainer callbacks: the late switch to higher precision and loss parity against a shadow run.

Both log through ``trainer.log`` (values added to ``logs`` inside ``on_log`` would reach the
console only), so their figures land in ``log_history``/trainer_state.json and every
``report_to`` integration. Callbacks are not handed the Trainer; they find it once, on the
call stack of ``on_train_begin`` (or take it from :meth:`bind`).
"""

from __future__ import annotations

import logging
import math
import re

import torch
from transformers import TrainerCallback

from ..formats.registry import PRECISIONS
from ..nn.convert import set_precision
from ..nn.linear import NVFP4Linear
from ._trainer import TrainerBound, unwrap

logger = logging.getLogger("hf_nvfp4")
_UNITS = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_tokens(text: str | int | float) -> int:
    """``"8.2T"`` -> 8_200_000_000_000; plain numbers pass through."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*(tokens)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a token count; write e.g. '8.2T', '500M' or 123456")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).upper()]))


class PrecisionSwitchCallback(TrainerBound):
    """Switch every NVFP4Linear to ``to`` (BF16) late in training: the paper's last-18% switch.

    switch_at: a fraction of max_steps (float in (0, 1)), an absolute step (int), or a token
        count (``"8.2T"``; or pass ``tokens=``). Tokens are converted to a step with
        ``tokens_per_step`` (or, if not given, the batch size x sequence length x accumulation
        x world size seen in the first batch).
    scope: "all" (all three GEMMs), "forward" (Fprop only, the cheap variant) or "backward"
        (Dgrad and Wgrad only: the paper's control, which recovers nothing).

    Logs ``precision_switch_step`` once. Correct after resuming on either side of the switch.

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
        if scope not in ("all", "forward", "backward"):
            raise ValueError(
                f"PrecisionSwitchCallback: scope must be 'all', 'forward' or 'backward', got {scope!r}"
            )
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
        self._args = args
        self.switch_step = self._resolve(args, state)
        if self.tokens is not None and self.switch_step is None:
            self._hook = model.register_forward_pre_hook(self._measure, with_kwargs=True)
        if self.switch_step is not None and state.global_step >= self.switch_step and not self.switched:
            self._apply(model)  # resumed after the switch

    def _measure(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not module.training:
            return
        world, accum = self._args.world_size, self._args.gradient_accumulation_steps
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
            self.log_metrics(args, state, control, {"precision_switch_step": pending})

    def on_train_end(self, args, state, control, **kwargs):
        self.on_log(args, state, control)



class SRStateCallback(TrainerCallback):
    """Deprecated and inert: the SR stream needs no callback any more. It is re-seeded at every
    training forward from torch's default generator, which the Trainer checkpoints itself."""


def weight_health(model) -> dict[str, float]:
    """Quantization health of every NVFP4 layer's weight, as the recipe quantizes it (16x16 tiles).

    underflow: share of non-zero weights that quantize to zero; saturated: share of elements
    whose scaled magnitude exceeds 6 and is clamped (the E4M3 block scale rounded down).
    Returns the mean and max over layers.
    """
    from ..formats.nvfp4 import TENSOR_SCALE, quantize_nvfp4

    under, sat = [], []
    with torch.no_grad():
        for m in unwrap(model).modules():
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


class QuantHealthCallback(TrainerBound):
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
                self.log_metrics(args, state, control, stats)


__all__ = ["PrecisionSwitchCallback", "QuantHealthCallback", "SRStateCallback", "parse_tokens", "weight_health"]
