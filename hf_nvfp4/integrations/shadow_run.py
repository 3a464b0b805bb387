"""ShadowRun: the lockstep shadow run that judges NVFP4 by its loss against an FP8 (or BF16) run.

Shared by :class:`~hf_nvfp4.FP8ShadowCallback` (the HF Trainer) and :class:`~hf_nvfp4.NVFP4Plugin`
(your own Accelerate loop). A copy of the model, identical at step 0, computes with the paper's
FP8 baseline numerics (``format="fp8_block"``: E4M3, 1x128 activation/gradient blocks, 128x128
weight blocks; BF16 blocks per ``allocation``: the paper's share by default; through Transformer
Engine's Float8BlockScaling where TE runs it), has its own AdamW with the same
hyperparameters, and trains on exactly the same micro-batches. Knows nothing of transformers or
accelerate: the entry points hand it batches, learning rates and the autocast dtype.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from ..config import FP8_ALLOCATIONS, NVFP4Recipe, fp8_baseline
from ..formats.registry import PRECISIONS
from ..nn.convert import convert_model, find_blocks, unconvert_model

logger = logging.getLogger("hf_nvfp4")
STATE_KEYS = ("model", "optimizer", "scheduler", "ema", "pending", "sr")


def shadow_tag(fmt: str) -> str:
    """The word the log keys use for a shadow format: ``fp8``, ``bf16`` or the format's name."""
    return "bf16" if fmt == "bf16" else "fp8" if fmt.startswith("fp8") or fmt == "mxfp8" else fmt


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def mean_across_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over all processes (itself when not distributed)."""
    if not dist_ready():
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.item() / torch.distributed.get_world_size()


class ShadowRun:
    """A lockstep shadow of a model with baseline numerics, its own AdamW, and the loss gap.

    >>> import torch.nn as nn
    >>> from hf_nvfp4.integrations.shadow_run import ShadowRun
    >>> run = ShadowRun("bf16")
    >>> run.keys
    ('shadow_bf16_loss', 'loss_gap_vs_bf16', 'loss_gap_vs_bf16_smoothed')
    """

    def __init__(self, format: str = "fp8_block", *, smoothing: float = 0.9, bf16_first_blocks: int | None = None,
                 bf16_last_blocks: int | None = None, allocation: str = "paper", owner: str = "ShadowRun"):
        if format not in PRECISIONS or format == "nvfp4":
            allowed = [p for p in PRECISIONS if p != "nvfp4"]
            raise ValueError(f"{owner}: format must be one of {allowed}, got {format!r}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"{owner}: smoothing must be in [0, 1), got {smoothing}")
        self.format, self.smoothing, self.owner = format, smoothing, owner
        if allocation not in FP8_ALLOCATIONS:
            raise ValueError(f"{owner}: allocation must be one of {FP8_ALLOCATIONS}, got {allocation!r}")
        # BF16 blocks: the paper's FP8 share (1 + 2 of 62) or the NVFP4 model's own;
        # explicit counts override either
        self.first, self.last, self.allocation = bf16_first_blocks, bf16_last_blocks, allocation
        self.tag = shadow_tag(format)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None  # optional: the Trainer callback steps one; the plugin follows the user's lr
        self.ema: float | None = None
        self.pending: list[float] = []  # per-step shadow losses not reported yet
        self._step_loss = 0.0

    @property
    def keys(self) -> tuple[str, str, str]:
        return f"shadow_{self.tag}_loss", f"loss_gap_vs_{self.tag}", f"loss_gap_vs_{self.tag}_smoothed"

    # -- building -----------------------------------------------------------------------------
    def build(self, model: nn.Module, groups: list[dict], *, rank: int | None = None,
              device: torch.device | None = None,
              optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None = None) -> nn.Module:
        """Copy ``model`` (unwrapped, before its first step), give it the baseline numerics and an
        optimizer (AdamW unless ``optimizer_factory`` says otherwise) over ``groups``:
        ``[{"names": [parameter names], "lr": ..., "weight_decay": ..., ...}, ...]`` (names as in
        ``model.named_parameters()``; every other key is the group's hyperparameter)."""
        shadow = copy.deepcopy(model)
        shadow.__dict__.pop("hf_quantizer", None)
        unconvert_model(shadow)
        if self.format != "bf16":
            like = getattr(model, "nvfp4_state", None)
            alloc = fp8_baseline(len(find_blocks(shadow)[1]), self.allocation,
                                 like=like.recipe if like is not None else None)
            first = alloc.bf16_first_blocks if self.first is None else self.first
            last = alloc.bf16_last_blocks if self.last is None else self.last
            # TE's native FP8/MXFP8 recipe where the GPU supports it (Hopper too), else emulated
            recipe = NVFP4Recipe.for_format(self.format, bf16_first_blocks=first,
                                            bf16_last_blocks=last, backend="auto")
            try:
                convert_model(shadow, recipe, rank=rank)
            except ValueError as exc:
                if "no Linear layer" not in str(exc):
                    raise
                raise ValueError(
                    f"{self.owner}: the {self.format} shadow keeps the first {first} and last {last} "
                    f"blocks in BF16 (allocation={self.allocation!r}), which leaves no layer of this model in "
                    f"{self.format}; use a deeper model or the bf16 shadow format"
                ) from None
        if device is not None:
            shadow.to(device)
        shadow.train()
        params = dict(shadow.named_parameters())
        opt_groups = []
        for g in groups:
            missing = [n for n in g["names"] if n not in params]
            if missing:
                raise ValueError(f"{self.owner}: no shadow parameter is named {missing[:3]}")
            hyper = {k: v for k, v in g.items() if k != "names"}
            opt_groups.append({"params": [params[n] for n in g["names"]], **hyper})
        self.optimizer = (optimizer_factory or torch.optim.AdamW)(opt_groups)
        self.model = shadow
        return shadow

    # -- one step -----------------------------------------------------------------------------
    def backward(self, batch, *, divisor: int = 1, autocast_dtype: torch.dtype | None = None,
                 forward: Callable[[nn.Module, object], torch.Tensor] | None = None) -> float:
        """Forward and backward one micro-batch (gradients accumulate, divided by ``divisor``)."""
        device = next(self.model.parameters()).device
        if forward is None:
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"{self.owner}: the shadow runs model(**batch).loss, so batch must be a dict of tensors "
                    f"(got {type(batch).__name__}); pass shadow_forward=fn(model, batch) -> loss otherwise"
                )
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = forward(self.model, batch) if forward is not None else self.model(**batch).loss
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                f"{self.owner}: the shadow's forward gave no loss tensor (got {type(loss).__name__}); pass the "
                "batch the model trained on, labels included, or shadow_forward=fn(model, batch) -> loss"
            )
        (loss / divisor).backward()
        value = loss.item() / divisor
        self._step_loss += value
        return value

    def step(self, *, max_grad_norm: float | None = None, lrs: list[float] | None = None) -> float:
        """Average gradients over processes, clip, step the optimizer (and scheduler); the step's loss."""
        device = next(self.model.parameters()).device
        if dist_ready():
            world = torch.distributed.get_world_size()
            for p in self.model.parameters():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        total = mean_across_ranks(self._step_loss, device)
        self._step_loss = 0.0
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_grad_norm)
        if lrs is not None:
            for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append(total)
        return total

    def report(self, loss: float) -> dict[str, float] | None:
        """The gap of ``loss`` (the NVFP4 run's, over the same steps) to the shadow's mean loss
        since the last report, and its EMA; None when the shadow has not stepped since."""
        if not self.pending:
            return None
        ref = sum(self.pending) / len(self.pending)
        self.pending = []
        gap = (loss - ref) / ref
        self.ema = gap if self.ema is None else self.smoothing * self.ema + (1 - self.smoothing) * gap
        k_loss, k_gap, k_ema = self.keys
        return {k_loss: ref, k_gap: gap, k_ema: self.ema}

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Tensors, numbers, strings, lists and dicts only: loads with ``torch.load(weights_only=True)``."""
        st = getattr(self.model, "nvfp4_state", None)
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "ema": self.ema,
            "pending": list(self.pending),
            "sr": st.state_dict() if st is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{self.owner}: the saved shadow state lacks {missing} (not a shadow checkpoint)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.ema, self.pending = state["ema"], list(state["pending"])
        st = getattr(self.model, "nvfp4_state", None)
        if st is not None and state["sr"]:
            st.load_state_dict(state["sr"])


__all__ = ["ShadowRun", "mean_across_ranks", "shadow_tag"]
