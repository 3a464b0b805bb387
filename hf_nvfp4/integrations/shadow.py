"""FP8ShadowCallback: loss parity of an NVFP4 run against an FP8 (or BF16) run of the same model.

The lockstep machinery is :class:`~hf_nvfp4.integrations.shadow_run.ShadowRun`, shared with the
Accelerate plugin; this module adds the Trainer events, the side file and the reference mode.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import torch

from ._trainer import SHADOW_FILE, TrainerBound, checkpoint_dir, unwrap
from .shadow_run import ShadowRun


def load_side_file(path: Path, owner: str) -> dict:
    """A side file this package wrote, loaded with ``torch.load(weights_only=True)``: tensors and
    plain containers only, so a pickle planted in its place cannot run code."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ValueError(
            f"{owner}: {str(path)!r} is not a checkpoint file this package wrote (it was loaded with "
            f"torch.load(weights_only=True) and refused: {str(exc).splitlines()[0]}); delete or replace it"
        ) from None
    if not isinstance(blob, dict):
        raise ValueError(f"{owner}: {str(path)!r} holds a {type(blob).__name__}, not a saved state dict")
    return blob

class FP8ShadowCallback(TrainerBound):
    """Judge NVFP4 by its loss relative to an FP8 (or BF16) run of the same model.

    mode="lockstep": a shadow copy of the model, identical at step 0, computes with the paper's
        FP8 baseline numerics (``format="fp8_block"``: E4M3, 1x128 activation/gradient blocks,
        128x128 weight blocks; BF16 blocks as ``allocation`` says; through Transformer Engine's
        Float8BlockScaling where TE runs it, compute capability >= 9.0), has its own AdamW with the
        same hyperparameters and schedule, and trains on exactly the same micro-batches. Costs
        one more model, its optimizer state and gradients (about 2x the memory of the weights'
        training state) and about one more training step of compute per step.
    mode="reference": reads a finished run's trainer_state.json (or a CSV with step[,tokens],loss)
        and logs the gap at matching steps, for free.

    allocation: which blocks of the shadow stay BF16. ``"paper"`` (default): the paper's FP8
        baseline as a share of the model's blocks (first 1 and last 2 of 62, about 5%; none of a
        4-block model); ``"nvfp4"``: the same blocks as the trained NVFP4 model, so the gap
        measures the number format alone. Explicit ``bf16_first_blocks``/``bf16_last_blocks``
        override both.

    At each logging step it logs ``shadow_fp8_loss``, ``loss_gap_vs_fp8`` =
    (loss - shadow_fp8_loss) / shadow_fp8_loss and ``loss_gap_vs_fp8_smoothed`` (an EMA); with
    ``format="bf16"`` the keys say ``bf16``. The shadow's weights, optimizer, schedule and
    stochastic-rounding stream go into every checkpoint (``nvfp4_shadow.pt``, read back with
    ``torch.load(weights_only=True)``) and come back on resume.

    >>> from hf_nvfp4 import FP8ShadowCallback
    >>> cb = FP8ShadowCallback()                      # lockstep FP8 shadow
    >>> cb_bf16 = FP8ShadowCallback(format="bf16")    # the paper's other reference
    """

    def __init__(
        self,
        mode: str = "lockstep",
        *,
        format: str = "fp8_block",
        reference: str | os.PathLike | None = None,
        smoothing: float = 0.9,
        bf16_first_blocks: int | None = None,
        bf16_last_blocks: int | None = None,
        allocation: str = "paper",
    ):
        if mode not in ("lockstep", "reference"):
            raise ValueError(f"FP8ShadowCallback: mode must be 'lockstep' or 'reference', got {mode!r}")
        self.run = ShadowRun(format, smoothing=smoothing, bf16_first_blocks=bf16_first_blocks,
                             bf16_last_blocks=bf16_last_blocks, allocation=allocation, owner="FP8ShadowCallback")
        self.mode, self.format, self.smoothing, self.tag = mode, format, smoothing, self.run.tag
        if mode == "lockstep" and reference is not None:
            raise ValueError("FP8ShadowCallback: reference= is for mode='reference'")
        self.reference = load_reference_losses(reference) if mode == "reference" else None
        self._batches: list[dict] = []
        self._logging = False

    @property
    def shadow(self):
        """The shadow model (None before training starts)."""
        return self.run.model

    # -- lockstep -----------------------------------------------------------------------------
    def _build_shadow(self, model, args, state):
        base = unwrap(model)
        from transformers import Trainer, get_scheduler

        decay = set(Trainer.get_decay_parameter_names(None, base))  # the Trainer's own rule
        named = [n for n, p in base.named_parameters() if p.requires_grad]
        hyper = {"lr": args.learning_rate, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        groups = [
            {"names": [n for n in named if n in decay], "weight_decay": args.weight_decay, **hyper},
            {"names": [n for n in named if n not in decay], "weight_decay": 0.0, **hyper},
        ]
        self.run.build(base, groups)
        self.run.scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.run.optimizer,
            num_warmup_steps=args.get_warmup_steps(state.max_steps),
            num_training_steps=state.max_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        self._hook = base.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            batch = {k: v.detach() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            if args:
                batch["input_ids"] = args[0].detach()
            self._batches.append(batch)

    def _shadow_step(self, args):
        batches, self._batches = self._batches, []
        if not batches:
            return
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        for b in batches:
            self.run.backward(b, divisor=len(batches), autocast_dtype=dtype)
        self.run.step(max_grad_norm=args.max_grad_norm)

    # -- callback events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.mode == "lockstep" and self.run.model is None:
            self._build_shadow(model, args, state)
            if state.global_step > 0:
                self._load(checkpoint_dir(args, state))

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode == "lockstep":
            self._shadow_step(args)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._logging or not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if self.mode == "lockstep":
            metrics = self.run.report(loss)
        else:
            ref = self.reference_at(state.global_step)
            metrics = None if ref is None else self._reference_gap(loss, ref)
        if metrics is None:
            return
        self._logging = True
        try:
            self.log_metrics(args, state, control, metrics)
        finally:
            self._logging = False

    def _reference_gap(self, loss: float, ref: float) -> dict:
        self.run.pending = [ref]  # the reference run plays the shadow's part
        return self.run.report(loss)

    def on_save(self, args, state, control, **kwargs):
        if self.mode != "lockstep" or self.run.model is None:
            return
        d = checkpoint_dir(args, state)
        d.mkdir(parents=True, exist_ok=True)
        blob = self.run.state_dict()
        if int(os.environ.get("RANK", "0")) == 0 or not torch.distributed.is_initialized():
            torch.save(blob, d / SHADOW_FILE)

    def _load(self, d: Path):
        f = d / SHADOW_FILE
        if not f.exists():
            raise FileNotFoundError(
                f"FP8ShadowCallback: resuming at {d} but it holds no {SHADOW_FILE}; the shadow "
                "cannot continue in lockstep (start the shadow from step 0)"
            )
        self.run.load_state_dict(load_side_file(f, "FP8ShadowCallback"))

    # -- reference -----------------------------------------------------------------------------
    def reference_at(self, step: int) -> float | None:
        steps, losses = self.reference
        if step in steps:
            return losses[steps.index(step)]
        if steps[0] < step < steps[-1]:  # linear interpolation between logged steps
            i = next(i for i, s in enumerate(steps) if s > step)
            s0, s1, l0, l1 = steps[i - 1], steps[i], losses[i - 1], losses[i]
            return l0 + (l1 - l0) * (step - s0) / (s1 - s0)
        return None

def load_reference_losses(path) -> tuple[list[int], list[float]]:
    """(steps, losses) from a trainer_state.json or a CSV with columns step[,tokens],loss."""
    if path is None:
        raise ValueError("FP8ShadowCallback(mode='reference') needs reference= a trainer_state.json or CSV file")
    p = Path(path)
    if p.is_dir():
        p = p / "trainer_state.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"FP8ShadowCallback: reference file {str(p)!r} does not exist; point reference= at the "
            "FP8 run's trainer_state.json or a CSV of step,tokens,loss"
        )
    pairs = []
    if p.suffix == ".csv":
        with p.open() as f:
            for row in csv.DictReader(f):
                if row.get("loss") not in (None, "") and row.get("step") not in (None, ""):
                    pairs.append((int(float(row["step"])), float(row["loss"])))
    else:
        hist = json.loads(p.read_text()).get("log_history", [])
        pairs = [(int(h["step"]), float(h["loss"])) for h in hist if "loss" in h and "step" in h]
    if not pairs:
        raise ValueError(
            f"FP8ShadowCallback: {str(p)!r} has no loss entries (expected log_history items with "
            "'step' and 'loss', or CSV columns step,loss)"
        )
    pairs.sort()
    return [s for s, _ in pairs], [v for _, v in pairs]
