"""NVFP4Plugin: the NVFP4 recipe for your own Accelerate training loop.

``plugin.prepare(accelerator, model, optimizer, ...)`` converts the model with the same
:func:`hf_nvfp4.convert_model` every other entry point uses (layer selection, TE or emulated
backend), *before* Accelerate wraps it (DDP, FSDP2), then returns exactly what
``accelerator.prepare`` returns. ``plugin.step(batch=, loss=)`` after each optimizer step
advances the late switch (:class:`~hf_nvfp4.integrations.switch.LateSwitch`) and the lockstep
FP8 shadow (:class:`~hf_nvfp4.integrations.shadow_run.ShadowRun`), the same machinery the Trainer
callbacks use, and returns what to log. The plugin is registered with
``accelerator.register_for_checkpointing``, so ``save_state``/``load_state`` carry the switch,
the schedule, the shadow and the stochastic-rounding (SR) stream.

Accelerate loads registered objects with ``torch.load(weights_only=False)``; the plugin's file
is checked with ``weights_only=True`` first (a load-state pre-hook), so a pickle planted in its
place is refused before Accelerate unpickles it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

from ..config import NVFP4Recipe, as_recipe
from ..nn.convert import convert_model, set_precision
from .shadow import load_side_file
from .shadow_run import ShadowRun, mean_across_ranks
from .switch import LateSwitch

logger = logging.getLogger("hf_nvfp4")
STATE_VERSION = 1
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _PluginSwitch(LateSwitch):
    owner = "NVFP4Plugin"


def wrapped_reason(model: nn.Module, accelerator=None) -> str | None:
    """Why ``model`` is already wrapped or sharded (so converting it now would be too late), or None."""
    if accelerator is not None and any(model is m for m in getattr(accelerator, "_models", ())):
        return "it was already prepared by this Accelerator"
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DataParallel, DistributedDataParallel)):
        return f"it is wrapped in {type(model).__name__}"
    if type(model).__name__ in ("DeepSpeedEngine", "PipelineEngine"):
        return f"it is wrapped in DeepSpeed's {type(model).__name__}"
    if "_orig_mod" in model._modules:
        return "it was compiled with torch.compile (compile after prepare, or let Accelerate's dynamo_backend do it)"
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return "it is wrapped in FSDP (FullyShardedDataParallel)"
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return "it was sharded with FSDP2's fully_shard"
    except ImportError:  # torch without torch.distributed
        pass
    try:
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            return "its parameters are DTensors (already sharded)"
    except ImportError:
        pass
    if "_original_forward" in vars(model):
        return "Accelerate already patched its forward (it went through accelerator.prepare before)"
    return None


class NVFP4Plugin:
    """The NVFP4 recipe for a custom Accelerate loop: conversion, late switch, FP8 shadow, resume.

    config: an :class:`hf_nvfp4.NVFP4Config` or ``NVFP4Recipe`` (None: the model's own recipe if
        it is converted already, else the paper's).
    switch_at: the late switch to ``switch_to`` (BF16): a fraction of ``max_steps`` (float in
        (0, 1)), a step (int), a token count (``"8.2T"``) or None (no switch). Same semantics
        and log key (``precision_switch_step``) as :class:`~hf_nvfp4.PrecisionSwitchCallback`.
    switch_scope: "all" (all three GEMMs), "forward" (Fprop only) or "backward" (Dgrad/Wgrad only).
    max_steps: the run's number of optimizer steps (needed for a fractional ``switch_at``).
    fp8_shadow: run the lockstep shadow (:class:`~hf_nvfp4.FP8ShadowCallback`'s definitions):
        logs ``shadow_fp8_loss``, ``loss_gap_vs_fp8`` and ``loss_gap_vs_fp8_smoothed``. The
        shadow uses an optimizer of your optimizer's class with the same param groups and
        follows the learning rate your optimizer stepped with.
    shadow_format: "fp8_block" (the paper's FP8 baseline) or "bf16" (keys then say bf16).
    shadow_max_grad_norm: clip the shadow's gradients as your loop clips the model's.
    shadow_forward: ``fn(model, batch) -> loss`` when ``model(**batch).loss`` does not apply.
    log_every: report the shadow keys every this many steps (averaged over them), like
        ``logging_steps`` for the callback.
    tokens_per_step: for a token-count switch (else measured from the first ``batch["input_ids"]``).

    >>> import hf_nvfp4
    >>> plugin = hf_nvfp4.NVFP4Plugin(hf_nvfp4.NVFP4Config(), switch_at=0.82, switch_scope="forward",
    ...                               max_steps=10_000, fp8_shadow=False)
    >>> plugin.switch.resolve(10_000)
    8200
    """

    def __init__(self, config=None, *, switch_at=None, switch_scope: str = "all", switch_to: str = "bf16",
                 max_steps: int | None = None, fp8_shadow: bool = False, shadow_format: str = "fp8_block",
                 shadow_max_grad_norm: float | None = None,
                 shadow_forward: Callable[[nn.Module, object], torch.Tensor] | None = None,
                 log_every: int = 1, smoothing: float = 0.9, tokens_per_step: int | None = None):
        self.recipe: NVFP4Recipe | None = None if config is None else as_recipe(config)
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"NVFP4Plugin: max_steps must be a positive int or None, got {max_steps!r}")
        if not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"NVFP4Plugin: log_every must be an int >= 1, got {log_every!r}")
        if not isinstance(fp8_shadow, bool):
            raise ValueError(f"NVFP4Plugin: fp8_shadow must be True or False, got {fp8_shadow!r}")
        self.max_steps, self.log_every = max_steps, log_every
        self.switch = None
        if switch_at is not None:
            self.switch = _PluginSwitch(switch_at, to=switch_to, scope=switch_scope, tokens_per_step=tokens_per_step)
            if self.switch.fraction is not None and max_steps is None:
                raise ValueError(
                    f"NVFP4Plugin: switch_at={switch_at} is a fraction of the run; pass max_steps= "
                    "(or give switch_at as a step number)"
                )
            self.switch.resolve(max_steps)
        self.shadow = None
        if fp8_shadow:
            self.shadow = ShadowRun(shadow_format, smoothing=smoothing, owner="NVFP4Plugin")
        self.shadow_max_grad_norm, self.shadow_forward = shadow_max_grad_norm, shadow_forward
        self.completed_steps = 0
        self._accelerator = self._model = None
        self._draw: torch.Generator | None = None
        self._lrs: list | None = None
        self._loss_sum = 0.0  # the current step's loss over its micro-batches
        self._losses: list[float] = []  # step losses since the last shadow report
        self._validated: dict | None = None

    # -- prepare ------------------------------------------------------------------------------
    def prepare(self, accelerator, *objects):
        """Convert the model among ``objects``, then ``accelerator.prepare(*objects)``; returns
        exactly what that returns. Call it once, with the model not yet wrapped."""
        if self._accelerator is not None:
            raise RuntimeError("NVFP4Plugin.prepare was called already: make one plugin per model and run")
        if accelerator.mixed_precision == "fp8" or getattr(accelerator, "fp8_enabled", False):
            raise ValueError(
                "NVFP4Plugin: this Accelerator has mixed_precision='fp8' (Accelerate's own FP8, which swaps "
                "Linear layers for Transformer Engine or torchao FP8 modules inside prepare and would fight "
                "NVFP4). Use Accelerator(mixed_precision='bf16'): the plugin runs the GEMMs in NVFP4 and "
                "autocast keeps the rest in BF16"
            )
        models = [o for o in objects if isinstance(o, nn.Module)]
        if len(models) != 1:
            raise ValueError(
                f"NVFP4Plugin.prepare: pass exactly one model (an nn.Module) among the objects, got {len(models)}; "
                "prepare other models with accelerator.prepare directly"
            )
        model = models[0]
        why = wrapped_reason(model, accelerator)
        if why:
            raise ValueError(
                f"NVFP4Plugin.prepare: the model must be converted before Accelerate wraps it, but {why}. "
                "Pass the plain model: plugin.prepare(accelerator, model, optimizer, ...) instead of "
                "accelerator.prepare(...)"
            )
        self._convert(model, accelerator.process_index)
        self._check_loaders(accelerator, objects)
        if self.shadow is not None:
            self._build_shadow(model, objects, accelerator)
        # The SR stream draws from a generator of the plugin's (checkpointed with it), so nothing the
        # loop draws from torch's generator (a DataLoader iterator after load_state) can shift it.
        self._accelerator, self._model = accelerator, model
        self._draw = torch.Generator().manual_seed(model.nvfp4_state.recipe.seed)
        self._bind_draw()
        for o in objects:  # the weight cache re-quantizes after every optimizer step
            if isinstance(o, torch.optim.Optimizer):
                model.nvfp4_state.watch_optimizer(o)
        out = accelerator.prepare(*objects)
        accelerator.register_for_checkpointing(self)
        accelerator.register_load_state_pre_hook(self._validate_file)
        if self.switch is not None and self.switch.due(self.completed_steps):
            self.switch.apply(model, notify=accelerator.is_main_process)  # switch_at=0
        return out

    @staticmethod
    def _check_loaders(accelerator, objects) -> None:
        """Warn where ``load_state`` cannot restore a data loader's order (issue 23): a shuffling
        ``RandomSampler`` draws a fresh permutation from torch's generator at every epoch, which a
        resumed run draws at another point, so its batches (and losses) differ from the uninterrupted
        run's. Accelerate's seedable sampler derives the order from a seed and the epoch instead."""
        cfg = getattr(accelerator, "dataloader_config", None)
        if getattr(cfg, "use_seedable_sampler", False) or not accelerator.is_main_process:
            return
        for loader in objects:
            if not isinstance(loader, torch.utils.data.DataLoader):
                continue
            sampler = getattr(loader.batch_sampler, "sampler", loader.sampler)
            if isinstance(sampler, torch.utils.data.RandomSampler):
                logger.warning(
                    "hf_nvfp4: this DataLoader shuffles (RandomSampler), and save_state/load_state cannot restore "
                    "its order: a resumed run would see other batches than the uninterrupted one. Build the "
                    "Accelerator with dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True) "
                    "(from accelerate.utils) and call loader.set_epoch(epoch) at each epoch, as "
                    "examples/accelerate_loop.py does")
                return

    def _convert(self, model: nn.Module, rank: int) -> None:
        state = getattr(model, "nvfp4_state", None)
        if state is not None and self.recipe is not None and state.recipe != self.recipe:
            diff = {k: (v, getattr(self.recipe, k)) for k, v in state.recipe.to_dict().items()
                    if self.recipe.to_dict()[k] != v}
            raise ValueError(
                f"NVFP4Plugin.prepare: the model is converted already with another recipe (model vs plugin: {diff}); "
                "pass NVFP4Plugin(None) to keep the model's recipe, or the same config"
            )
        self.recipe = state.recipe if state is not None and self.recipe is None else self.recipe or NVFP4Recipe()
        convert_model(model, self.recipe, rank=rank)  # each process its own SR stream

    def _build_shadow(self, model, objects, accelerator) -> None:
        optimizers = [o for o in objects if isinstance(o, torch.optim.Optimizer)]
        if len(optimizers) != 1:
            raise ValueError(
                "NVFP4Plugin: fp8_shadow=True copies your optimizer's settings, so pass exactly one optimizer to "
                f"plugin.prepare (got {len(optimizers)})"
            )
        opt = optimizers[0]
        names = {id(p): n for n, p in model.named_parameters()}
        groups = []
        for g in opt.param_groups:
            unknown = [p for p in g["params"] if id(p) not in names]
            if unknown:
                raise ValueError("NVFP4Plugin: the optimizer holds parameters that are not the model's")
            groups.append({"names": [names[id(p)] for p in g["params"]],
                           **{k: v for k, v in g.items() if k != "params"}})
        factory = None
        if type(opt).__module__.startswith("torch.optim"):
            factory = type(opt)  # the user's optimizer class; every group carries all its settings
        elif accelerator.is_main_process:
            logger.warning("hf_nvfp4: the FP8 shadow trains with AdamW (your %s is not a torch.optim optimizer); "
                           "it takes each param group's settings", type(opt).__name__)
        self.shadow.build(model, groups, rank=accelerator.process_index, device=accelerator.device,
                          optimizer_factory=factory)
        opt.register_step_pre_hook(self._record_lrs)

    def _record_lrs(self, optimizer, args, kwargs) -> None:
        self._lrs = [g["lr"] for g in optimizer.param_groups]  # what this step uses, before any scheduler

    def _bind_draw(self) -> None:
        for m in (self._model, getattr(self.shadow, "model", None)):
            st = getattr(m, "nvfp4_state", None) if m is not None else None
            if st is not None:
                st.draw_generator = self._draw

    # -- step ---------------------------------------------------------------------------------
    def step(self, batch=None, loss: torch.Tensor | float | None = None) -> dict[str, float]:
        """Call after ``optimizer.step()`` (under ``accelerator.accumulate`` after every micro-batch:
        a step counts when Accelerate syncs gradients). Returns the metrics to log now."""
        acc = self._accelerator
        if acc is None:
            raise RuntimeError("NVFP4Plugin.step: call plugin.prepare(accelerator, model, optimizer, ...) first")
        accum = max(1, int(getattr(acc, "gradient_accumulation_steps", 1)))
        self._bind_draw()  # follows set_recipe, which builds a new NVFP4State
        if self.shadow is not None:
            if batch is None or loss is None:
                raise ValueError("NVFP4Plugin.step: fp8_shadow=True needs batch= (what the model saw) and loss=")
            self.shadow.backward(batch, divisor=accum, autocast_dtype=_AUTOCAST.get(acc.mixed_precision),
                                 forward=self.shadow_forward)
            self._loss_sum += float(loss.detach() if isinstance(loss, torch.Tensor) else loss) / accum
        if not acc.sync_gradients:
            return {}
        self._model.nvfp4_state.invalidate_weights()  # also after set_recipe, which builds a new state
        self.completed_steps += 1
        metrics: dict[str, float] = {}
        sw = self.switch
        if sw is not None and sw.switch_step is None and sw.tokens is not None:
            ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
            if not isinstance(ids, torch.Tensor):
                raise ValueError("NVFP4Plugin: a token-count switch_at needs batch['input_ids'] or tokens_per_step=")
            sw.measure(ids.numel() * acc.num_processes * accum)
        if sw is not None and sw.due(self.completed_steps):
            sw.apply(self._model, notify=acc.is_main_process)
            metrics["precision_switch_step"] = float(self.completed_steps)
        if self.shadow is not None:
            self.shadow.step(max_grad_norm=self.shadow_max_grad_norm, lrs=self._lrs)
            device = next(self.shadow.model.parameters()).device
            self._losses.append(mean_across_ranks(self._loss_sum, device))
            self._loss_sum = 0.0
            if self.completed_steps % self.log_every == 0:
                metrics.update(self.shadow.report(sum(self._losses) / len(self._losses)))
                self._losses = []
        return metrics

    # -- checkpointing (accelerator.save_state / load_state) ------------------------------------
    def state_dict(self) -> dict:
        """Tensors, numbers, strings, lists and dicts only (loads with ``weights_only=True``)."""
        if self._model is None:
            raise RuntimeError("NVFP4Plugin.state_dict: call plugin.prepare first")
        return {
            "version": STATE_VERSION,
            "completed_steps": self.completed_steps,
            "switch": self.switch.state_dict() if self.switch is not None else None,
            "schedule": self.switch.describe() if self.switch is not None else None,  # for messages on resume
            "max_steps": self.max_steps,
            "nvfp4_state": self._model.nvfp4_state.state_dict(),
            "sr_draw": self._draw.get_state(),
            "shadow": self.shadow.state_dict() if self.shadow is not None else None,
            "losses": list(self._losses),
            "lrs": [float(x) for x in self._lrs] if self._lrs is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        if self._validated is not None:  # the copy read with weights_only=True (same file)
            state, self._validated = self._validated, None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"NVFP4Plugin.load_state_dict: not an NVFP4Plugin state (version {STATE_VERSION})")
        if (state["shadow"] is None) != (self.shadow is None):  # a shadow cannot be made up mid-run
            raise ValueError(
                f"NVFP4Plugin.load_state_dict: the checkpoint was saved {'with' if state['shadow'] else 'without'} "
                f"a shadow, this plugin has {'one' if self.shadow else 'none'}; build the plugin as the saving run did"
            )
        saved = state["nvfp4_state"].get("recipe")
        main = self._accelerator is None or self._accelerator.is_main_process
        if saved is not None and saved != self._model.nvfp4_state.recipe.to_dict() and main:
            logger.warning("hf_nvfp4: resuming with another recipe than the checkpoint's (%s); the run continues "
                           "with the plugin's", saved)
        self.completed_steps = int(state["completed_steps"])
        self._model.nvfp4_state.load_state_dict(state["nvfp4_state"])
        self._load_switch(state, main)
        self._draw.set_state(state["sr_draw"])
        if self.shadow is not None:
            self.shadow.load_state_dict(state["shadow"])
        self._losses, self._lrs, self._loss_sum = list(state["losses"]), state["lrs"], 0.0

    def _load_switch(self, state: dict, main: bool) -> None:
        """This plugin's own arguments decide the schedule (issue 23); the checkpoint gives what was
        measured (a token-count switch's tokens per step) and where the run stands."""
        sw, saved = self.switch, state["switch"] or {}
        if sw is None and not saved:
            return  # no schedule on either side: the model's precision is what the checkpoint's NVFP4State says
        if sw is not None and sw.tokens is not None and sw.switch_step is None and saved.get("tokens_per_step"):
            sw.measure(int(saved["tokens_per_step"]))  # measured by the saving run, same batches
        now = sw.switch_step if sw is not None else None
        if (saved.get("switch_step") != now or (state["switch"] is None) != (sw is None)) and main:
            logger.warning(
                "hf_nvfp4: resuming with another switch schedule than the checkpoint's: the checkpoint (%s, "
                "max_steps=%s) switches after step %s, this plugin (%s, max_steps=%s) after step %s; the run "
                "follows this plugin's", state.get("schedule") or ("no switch" if not saved else "its schedule"),
                state.get("max_steps", "?"), saved.get("switch_step"),
                sw.describe() if sw is not None else "no switch", self.max_steps, now)
        st = self._model.nvfp4_state
        before, fmt = (st.precision, st.forward_precision), st.recipe.format
        set_precision(self._model, fmt)  # then what this plugin's schedule says for this step
        if sw is not None:
            sw.switched = False
            if sw.due(self.completed_steps):
                sw.apply(self._model, notify=False)
        after = (st.precision, st.forward_precision)
        if after != before and main:
            logger.warning("hf_nvfp4: after step %d the checkpoint's model computed in %s (precision, forward "
                           "precision); this plugin's schedule says %s, which the run now follows",
                           self.completed_steps, before, after)

    def _validate_file(self, models, input_dir) -> None:
        """Read this plugin's file with ``weights_only=True`` before Accelerate unpickles it."""
        objs = getattr(self._accelerator, "_custom_objects", [])
        index = next((i for i, o in enumerate(objs) if o is self), None)
        if index is None:
            return
        self._check_layout(Path(input_dir))
        f = Path(input_dir) / f"custom_checkpoint_{index}.pkl"
        if f.exists():  # when missing, Accelerate says so itself
            self._validated = load_side_file(f, "NVFP4Plugin")

    def _check_layout(self, input_dir: Path) -> None:
        """A checkpoint written under FSDP keeps the model in accelerate's FSDP layout (a sharded
        distributed checkpoint, ``pytorch_model_fsdp_0/``, or a full ``pytorch_model_fsdp.bin``),
        which only an FSDP Accelerator reads (of any world size: the distributed checkpoint
        reshards); a non-FSDP Accelerator would fail on a missing ``pytorch_model.bin``."""
        fsdp_files = sorted(p.name for p in input_dir.glob("pytorch_model_fsdp*"))
        plain_files = sorted(p.name for p in input_dir.glob("model*.safetensors")) + sorted(
            p.name for p in input_dir.glob("pytorch_model*.bin") if "fsdp" not in p.name)
        is_fsdp = str(getattr(self._accelerator, "distributed_type", "")).endswith("FSDP")
        if fsdp_files and not plain_files and not is_fsdp:
            raise ValueError(
                f"NVFP4Plugin: {input_dir} was saved under FSDP ({', '.join(fsdp_files)}: accelerate's FSDP "
                f"checkpoint), but this Accelerator is not FSDP ({self._accelerator.distributed_type}, "
                f"{self._accelerator.num_processes} process(es)). Resume it with an FSDP Accelerator (any number "
                "of processes: the sharded checkpoint reshards), or first turn the sharded weights into one file "
                f"with `accelerate merge-weights {input_dir / 'pytorch_model_fsdp_0'} OUT_DIR` and load those "
                "into a fresh run"
            )
        if plain_files and not fsdp_files and is_fsdp:
            raise ValueError(
                f"NVFP4Plugin: {input_dir} was saved without FSDP ({', '.join(plain_files)}), but this Accelerator "
                "is FSDP, which reads only accelerate's FSDP checkpoint (pytorch_model_fsdp*). Resume with the "
                "distributed setup that saved it (DDP or one process)"
            )


__all__ = ["NVFP4Plugin", "wrapped_reason"]
