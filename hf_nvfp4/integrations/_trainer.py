"""What the Trainer callbacks share: explicit Trainer binding, logging, checkpoint paths.

Callbacks never search for their Trainer. A bound callback (``cb.bind(trainer)``; the recipe
runner binds its own) logs through ``trainer.log``, so its keys reach log_history and every
``report_to`` integration. An unbound one records its keys in ``state.log_history`` (hence
trainer_state.json), and says once that report integrations need the binding.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("hf_nvfp4")
SHADOW_FILE = "nvfp4_shadow.pt"


def unwrap(model):
    """The model inside a DDP (or similar) wrapper."""
    return getattr(model, "module", model)


def checkpoint_dir(args, state) -> Path:
    return Path(args.output_dir) / f"checkpoint-{state.global_step}"


class TrainerBound(TrainerCallback):
    """A callback that logs metrics of its own."""

    trainer = None
    _warned = False

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        """The weights changed: the weight cache re-quantizes them (its version guards see it too)."""
        st = getattr(unwrap(model), "nvfp4_state", None) if model is not None else None
        if st is not None:
            st.invalidate_weights()

    def bind(self, trainer):
        """Tell the callback its Trainer, so its keys reach every report_to integration."""
        self.trainer = trainer
        return self

    def log_metrics(self, args, state, control, metrics: dict) -> None:
        """Log ``metrics`` now, without cancelling the step's own pending log."""
        if self.trainer is not None:
            should = control.should_log  # trainer.log resets it
            self.trainer.log(metrics)
            control.should_log = should
            return
        state.log_history.append({**metrics, "step": state.global_step})
        report = [r for r in (args.report_to or []) if r != "none"]
        if report and not self._warned and state.is_world_process_zero:
            self._warned = True
            logger.warning(
                "hf_nvfp4: %s is not bound to its Trainer: %s reach trainer_state.json but not %s; "
                "add it with trainer.add_callback(cb.bind(trainer))", type(self).__name__, sorted(metrics), report
            )
