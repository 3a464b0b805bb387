"""FP8ShadowCallback: loss parity of an NVFP4 run against an FP8 (or BF16) run of the same model."""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path

import torch

from ..formats.registry import PRECISIONS
from ..nn.convert import convert_model, find_blocks, unconvert_model
from ..ops.baselines import FP8_ALLOCATIONS, fp8_baseline_recipe
from ..ops.recipe import NVFP4Recipe
from ._trainer import SHADOW_FILE, TrainerBound, checkpoint_dir, unwrap


def _shadow_tag(fmt: str) -> str:
    return "bf16" if fmt == "bf16" else "fp8" if fmt.startswith("fp8") or fmt == "mxfp8" else fmt


class FP8ShadowCallback(TrainerBound):
    """Judge NVFP4 by its loss relative to an FP8 (or BF16) run of the same model.

    mode="lockstep": a shadow copy of the model, identical at step 0, computes with the paper's
        FP8 baseline numerics (``format="fp8_block"``: E4M3, 1x128 activation/gradient blocks,
        128x128 weight blocks; BF16 blocks as ``allocation`` says), has its own AdamW with the
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
    stochastic-rounding stream go into every checkpoint and come back on resume.

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
        if format not in PRECISIONS or format == "nvfp4":
            raise ValueError(
                f"FP8ShadowCallback: format must be one of {[p for p in PRECISIONS if p != 'nvfp4']}, got {format!r}"
            )
        if not 0 <= smoothing < 1:
            raise ValueError(f"FP8ShadowCallback: smoothing must be in [0, 1), got {smoothing}")
        self.mode, self.format, self.smoothing = mode, format, smoothing
        self.tag = _shadow_tag(format)
        if allocation not in FP8_ALLOCATIONS:
            raise ValueError(f"FP8ShadowCallback: allocation must be one of {FP8_ALLOCATIONS}, got {allocation!r}")
        self.first, self.last, self.allocation = bf16_first_blocks, bf16_last_blocks, allocation
        self.reference = load_reference_losses(reference) if mode == "reference" else None
        if mode == "lockstep" and reference is not None:
            raise ValueError("FP8ShadowCallback: reference= is for mode='reference'")
        self.shadow = self.optimizer = self.scheduler = None
        self._batches: list[dict] = []
        self._losses: list[float] = []
        self._ema = None
        self._logging = False

    # -- lockstep -----------------------------------------------------------------------------
    def _build_shadow(self, model, args, state):
        base = unwrap(model)
        shadow = copy.deepcopy(base)
        shadow.__dict__.pop("hf_quantizer", None)
        unconvert_model(shadow)
        if self.format != "bf16":
            n_blocks = len(find_blocks(shadow)[1])
            like = getattr(base, "nvfp4_state", None)
            alloc = fp8_baseline_recipe(n_blocks, self.allocation, like=like.recipe if like else None)
            first = alloc.bf16_first_blocks if self.first is None else self.first
            last = alloc.bf16_last_blocks if self.last is None else self.last
            cfg = NVFP4Recipe.for_format(
                self.format, bf16_first_blocks=first, bf16_last_blocks=last, backend="emulated"
            )
            convert_model(shadow, cfg)
        shadow.train()
        from transformers import Trainer, get_scheduler

        decay = set(Trainer.get_decay_parameter_names(None, shadow))  # the Trainer's own rule
        named = [(n, p) for n, p in shadow.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
        )
        self.scheduler = get_scheduler(
            args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=args.get_warmup_steps(state.max_steps),
            num_training_steps=state.max_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
        self.shadow = shadow
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
        device = next(self.shadow.parameters()).device
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        total = 0.0
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = self.shadow(**b).loss
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.shadow.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
            t = torch.tensor([total], device=device)
            torch.distributed.all_reduce(t)
            total = t.item() / world
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.shadow.parameters(), args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._losses.append(total)

    # -- callback events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.mode == "lockstep" and self.shadow is None:
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
            if not self._losses:
                return
            ref = sum(self._losses) / len(self._losses)
            self._losses = []
        else:
            ref = self.reference_at(state.global_step)
            if ref is None:
                return
        gap = (loss - ref) / ref
        self._ema = gap if self._ema is None else self.smoothing * self._ema + (1 - self.smoothing) * gap
        self._logging = True
        try:
            self.log_metrics(
                args,
                state,
                control,
                {
                    f"shadow_{self.tag}_loss": ref,
                    f"loss_gap_vs_{self.tag}": gap,
                    f"loss_gap_vs_{self.tag}_smoothed": self._ema,
                },
            )
        finally:
            self._logging = False

    def on_save(self, args, state, control, **kwargs):
        if self.mode != "lockstep" or self.shadow is None:
            return
        d = checkpoint_dir(args, state)
        d.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        st = getattr(self.shadow, "nvfp4_state", None)
        blob = {
            "model": self.shadow.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self._ema,
            "pending": self._losses,
            "sr": st.state_dict() if st is not None else None,
        }
        if rank == 0 or not torch.distributed.is_initialized():
            torch.save(blob, d / SHADOW_FILE)

    def _load(self, d: Path):
        f = d / SHADOW_FILE
        if not f.exists():
            raise FileNotFoundError(
                f"FP8ShadowCallback: resuming at {d} but it holds no {SHADOW_FILE}; the shadow "
                "cannot continue in lockstep (start the shadow from step 0)"
            )
        blob = torch.load(f, weights_only=False)
        self.shadow.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        self._ema, self._losses = blob["ema"], list(blob["pending"])
        st = getattr(self.shadow, "nvfp4_state", None)
        if st is not None and blob["sr"]:
            st.load_state_dict(blob["sr"])

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
