"""Trainer callbacks: the late switch to higher precision and weight-health statistics.

They log through ``trainer.log`` when bound (``cb.bind(trainer)``; the recipe runner binds its
own), so their figures land in ``log_history``/trainer_state.json and every ``report_to``
integration. The schedule of the late switch is :class:`~hf_nvfp4.integrations.switch.LateSwitch`,
shared with the Accelerate plugin.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from ..nn.convert import require_converted
from ..nn.linear import NVFP4Linear
from ._trainer import TrainerBound, unwrap
from .switch import LateSwitch, parse_tokens

logger = logging.getLogger("hf_nvfp4")


class PrecisionSwitchCallback(LateSwitch, TrainerBound):
    """Switch every NVFP4Linear to ``to`` (BF16) late in training: the paper's last-18% switch.

    switch_at: a fraction of max_steps (float in (0, 1)), an absolute step (int), or a token
        count (``"8.2T"``; or pass ``tokens=``). Tokens are converted to a step with
        ``tokens_per_step`` (or, if not given, the batch size x sequence length x accumulation
        x world size seen in the first batch).
    scope: "all" (all three GEMMs), "forward" (Fprop only, the cheap variant) or "backward"
        (Dgrad and Wgrad only, the paper's control).

    Logs ``precision_switch_step`` once. Correct after resuming on either side of the switch.
    A model without NVFP4 layers is refused (at ``bind`` and at train begin): there is nothing
    to switch. So is a schedule that cannot take effect (see
    :class:`~hf_nvfp4.integrations.switch.LateSwitch`: step 0 from a fraction, or at or after
    ``max_steps``).

    >>> from hf_nvfp4 import PrecisionSwitchCallback
    >>> cb = PrecisionSwitchCallback(0.82)            # the last 18% of steps in BF16
    >>> cb2 = PrecisionSwitchCallback(tokens="8.2T", tokens_per_step=2**22)
    """

    owner = "PrecisionSwitchCallback"

    def bind(self, trainer):
        if getattr(trainer, "model", None) is not None:
            require_converted(unwrap(trainer.model), self.owner)
        return super().bind(trainer)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            require_converted(unwrap(model), self.owner)
        self._args = args
        self.resolve(state.max_steps)
        if self.tokens is not None and self.switch_step is None:
            self._hook = model.register_forward_pre_hook(self._measure, with_kwargs=True)
        if self.due(state.global_step):
            self.apply(model, notify=state.is_world_process_zero)  # resumed after the switch

    def _measure(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or not module.training:
            return
        self.measure(ids.numel() * self._args.world_size * self._args.gradient_accumulation_steps)
        self._hook.remove()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.due(state.global_step):
            self.apply(model, notify=state.is_world_process_zero)
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
            tile = (1, 16) if m.nvfp4_state.recipe.disable_2d_quantization else (16, 16)
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
