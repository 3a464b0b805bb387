"""Run a recipe end to end with the HF Trainer: the ``hf-nvfp4 train`` command."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

from .recipe import RunSpec

logger = logging.getLogger("hf_nvfp4")


def tensorboard_dir(recipe: RunSpec) -> Path | None:
    """Where TensorBoard events go: ``OUTPUT_DIR/logs``; None when ``logging.report_to`` has no tensorboard."""
    if "tensorboard" not in recipe.logging.report_to:
        return None
    return Path(recipe.output_dir) / "logs"


@contextlib.contextmanager
def run_scope(recipe: RunSpec, quiet: bool = False):
    """Per-run process settings, restored on exit: offline switches (unless the recipe names a hub
    source), the TensorBoard/W&B directories (inside this run's output dir), library verbosity and
    progress bars, and the global RNGs the run seeds. Two runs in one process never share state."""
    import random

    import datasets
    import huggingface_hub.constants as hc
    import numpy as np
    import transformers

    tb_dir = tensorboard_dir(recipe)
    env = {"TENSORBOARD_LOGGING_DIR": str(tb_dir)} if tb_dir else {}
    if not recipe.needs_network():
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if recipe.logging.wandb_project:
        env["WANDB_PROJECT"] = recipe.logging.wandb_project
    saved_env = {k: os.environ.get(k) for k in env}
    saved = (hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, transformers.logging.get_verbosity(),
             datasets.is_progress_bar_enabled(), logger.level)
    rng = (torch.random.get_rng_state(), random.getstate(), np.random.get_state())
    os.environ.update(env)
    if "HF_HUB_OFFLINE" in env:
        hc.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    if quiet:
        datasets.disable_progress_bars()
        transformers.logging.set_verbosity_error()
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        hc.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[0], saved[1]
        transformers.logging.set_verbosity(saved[2])
        (datasets.enable_progress_bars if saved[3] else datasets.disable_progress_bars)()
        logger.setLevel(saved[4])
        torch.random.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])


def callbacks_from_recipe(recipe: RunSpec) -> list:
    """The callbacks a recipe asks for."""
    from .integrations.callbacks import PrecisionSwitchCallback, QuantHealthCallback

    cbs: list = []
    ps = recipe.precision_switch
    if ps.at is not None:
        cbs.append(PrecisionSwitchCallback(ps.at, to=ps.to, scope=ps.scope))
    sh = recipe.fp8_shadow
    if sh.enabled:
        from .integrations.shadow import FP8ShadowCallback

        cbs.append(FP8ShadowCallback(sh.mode, format=sh.format, reference=sh.reference))
    if recipe.logging.health_every_n_steps and recipe.nvfp4 is not None:
        cbs.append(QuantHealthCallback(recipe.logging.health_every_n_steps))
    ev = recipe.evaluation
    if ev.tasks:
        from .integrations.lm_eval import LMEvalCallback

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


def build_model(recipe: RunSpec, vocab_size: int):
    """from_pretrained with NVFP4Config, or a fresh model from the recipe's architecture config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .integrations.transformers import from_config

    m = recipe.model
    dtype = getattr(torch, m.dtype)
    trust = {"trust_remote_code": True} if m.trust_remote_code else {}
    if m.name_or_path:
        kw = {"quantization_config": recipe.nvfp4} if recipe.nvfp4 is not None else {}
        return AutoModelForCausalLM.from_pretrained(m.name_or_path, dtype=dtype, **kw, **trust)
    arch = dict(m.config)
    model_type = arch.pop("model_type")
    arch.setdefault("vocab_size", vocab_size)
    cfg = AutoConfig.for_model(model_type, **arch)
    if recipe.nvfp4 is None:
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, **trust)
    return from_config(cfg, recipe.nvfp4, dtype=dtype, **trust)


def training_arguments(recipe: RunSpec, quiet: bool = False):
    from transformers import TrainingArguments

    t = recipe.training
    decay = int(round(t.decay_fraction * t.max_steps))
    warmup = min(t.warmup_steps, t.max_steps - decay)
    report = [r for r in recipe.logging.report_to if r != "none"]
    return TrainingArguments(
        output_dir=recipe.output_dir,
        run_name=recipe.logging.run_name or recipe.name,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        lr_scheduler_type="warmup_stable_decay",
        lr_scheduler_kwargs={"num_decay_steps": decay, "min_lr_ratio": t.min_lr_ratio},
        warmup_steps=warmup,
        adam_beta1=t.beta1,
        adam_beta2=t.beta2,
        weight_decay=t.weight_decay,
        max_grad_norm=t.grad_clip,
        seed=t.seed,
        bf16=t.bf16,
        use_cpu=not torch.cuda.is_available(),
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        report_to=report or "none",
        dataloader_num_workers=t.dataloader_workers,
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        disable_tqdm=quiet,
    )


def run_recipe(
    recipe: RunSpec,
    *,
    extra_callbacks=None,
    evaluate_at_end: bool = False,
    quiet: bool = False,
    resume_from_checkpoint: str | None = None,
    evaluate_bf16_at_end: bool = False,
) -> dict:
    """Train per ``recipe``; returns the summary (also printed and written to summary.json).

    evaluate_at_end: also report the loss on the recipe's held-out split (``eval_loss``).
    evaluate_bf16_at_end: also the held-out loss of the trained weights computed in BF16
        (``eval_loss_bf16``), as the paper's downstream evaluations of NVFP4-trained models.
    quiet: no progress bars or summary print (for sweeps that show their own progress).
    resume_from_checkpoint: a ``checkpoint-N`` directory to continue from
    (:func:`hf_nvfp4.rundir.prepare_output_dir` picks it for the train command).
    """
    with run_scope(recipe, quiet):
        return _run(recipe, extra_callbacks, evaluate_at_end, quiet, resume_from_checkpoint, evaluate_bf16_at_end)


def _run(recipe: RunSpec, extra_callbacks, evaluate_at_end: bool, quiet: bool, resume_from_checkpoint=None,
         evaluate_bf16_at_end: bool = False) -> dict:
    from transformers import Trainer, default_data_collator

    from .data import build_datasets, build_tokenizer

    torch.manual_seed(recipe.training.seed)
    tokenizer = build_tokenizer(recipe)
    args = training_arguments(recipe, quiet)
    with args.main_process_first(desc="dataset"):
        train_ds, eval_ds = build_datasets(recipe, tokenizer)
    vocab = int(math.ceil(len(tokenizer) / 16) * 16)
    model = build_model(recipe, vocab)
    timer = _step_timer()
    callbacks = callbacks_from_recipe(recipe) + list(extra_callbacks or []) + [timer]
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    for cb in callbacks:  # bound explicitly: callbacks never search for their Trainer
        if hasattr(cb, "bind"):
            cb.bind(trainer)
    say_fsdp_fallback(trainer)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    elapsed = time.perf_counter() - start
    trainer.save_model(recipe.output_dir)
    tokenizer.save_pretrained(recipe.output_dir)
    if trainer.is_world_process_zero():
        trainer.state.save_to_json(str(Path(recipe.output_dir) / "trainer_state.json"))
    t = recipe.training
    tokens = trainer.state.global_step * t.batch_size * t.grad_accum * args.world_size * recipe.data.seq_len
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "recipe": recipe.name,
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else result.training_loss,
        "train_loss_mean": result.training_loss,
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
        "seconds": elapsed,
        # the first step compiles the NVFP4 kernels (once per shape; cached on disk for later runs)
        "first_step_seconds": timer.first_step_seconds,
        "tokens_per_s_after_first_step": timer.rate_after_first(tokens, trainer.state.global_step),
        "world_size": args.world_size,
        "checkpoint": str(Path(recipe.output_dir).resolve()),
        "logs": str(tensorboard_dir(recipe).resolve()) if tensorboard_dir(recipe) else None,
        "nvfp4": recipe.nvfp4.to_dict() if recipe.nvfp4 is not None else None,
        "loss_curve": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
    }
    if evaluate_at_end and eval_ds is not None:
        summary["eval_loss"] = trainer.evaluate()["eval_loss"]
    if evaluate_bf16_at_end and eval_ds is not None:
        summary["eval_loss_bf16"] = evaluate_in_bf16(trainer, model)
    ev = recipe.evaluation
    if ev.tasks and trainer.is_world_process_zero() and not trainer.is_fsdp_enabled:
        from .integrations.lm_eval import evaluate_lm, headline_metrics

        res = evaluate_lm(
            model, tokenizer, ev.tasks, include_path=ev.include_path, limit=ev.limit, batch_size=ev.batch_size
        )
        summary["eval"] = headline_metrics(res)
    if trainer.is_world_process_zero():
        (Path(recipe.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        (Path(recipe.output_dir) / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2, default=str))
        if not quiet:
            print(format_summary(summary), flush=True)
    return summary


def say_fsdp_fallback(trainer) -> None:
    """accelerate enables FSDP only for GPU launches: say so once per run, on the main process only."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        if trainer.is_world_process_zero():
            logger.warning(
                "hf_nvfp4: the accelerate config asks for FSDP, but accelerate enables FSDP only for GPU "
                "launches; this run uses %s instead",
                trainer.accelerator.distributed_type,
            )
def _step_timer():
    """A TrainerCallback (transformers is imported only when a run starts)."""
    from transformers import TrainerCallback

    class _StepTimer(TrainerCallback):
        """Times the first step apart (it compiles the NVFP4 kernels), says so before it starts, and
        invalidates the weight cache after every optimizer step (its version guards see the step too)."""

        def __init__(self) -> None:
            self._start = self._first_end = self._last_end = None
            self.first_step_seconds: float | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None and getattr(model, "nvfp4_state", None) is not None and state.is_world_process_zero:
                logger.warning("hf_nvfp4: compiling NVFP4 kernels (once per shape, cached on disk): "
                               "the first step takes longer")
            self._start = time.perf_counter()

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            st = getattr(model, "nvfp4_state", None)
            if st is not None:
                st.invalidate_weights()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self._first_end is None and self._start is not None:
                self._first_end = now
                self.first_step_seconds = now - self._start
            self._last_end = now

        def rate_after_first(self, tokens: int, steps: int) -> float | None:
            """Tokens/s over the steps after the first (None with fewer than two steps)."""
            if steps < 2 or self._first_end is None or self._last_end <= self._first_end:
                return None
            return tokens * (steps - 1) / steps / (self._last_end - self._first_end)

    return _StepTimer()


def evaluate_in_bf16(trainer, model) -> float:
    """Held-out loss with every converted layer computing in BF16; the switch state is restored."""
    from .nn.convert import is_converted, temporary_precision

    # A model with nothing converted (the bf16 baseline) already computes in high precision.
    with temporary_precision(model, "bf16" if is_converted(model) else None):
        return trainer.evaluate(metric_key_prefix="eval_bf16")["eval_bf16_loss"]


def format_summary(s: dict) -> str:
    first = f"{s['first_loss']:.4f} -> " if s["first_loss"] is not None else ""
    return "\n".join(
        [
            f"hf-nvfp4: finished recipe {s['recipe']!r}: {s['steps']} steps on {s['world_size']} process(es)",
            f"  loss        {first}{s['final_loss']:.4f}",
            f"  throughput  {s['tokens_per_s']:.0f} tokens/s ({s['tokens']} tokens in {s['seconds']:.0f} s)"
            + (f"; {s['tokens_per_s_after_first_step']:.0f} tokens/s after the first step "
               f"({s['first_step_seconds']:.0f} s, compiling)" if s.get("tokens_per_s_after_first_step") else ""),
            f"  checkpoint  {s['checkpoint']}  (a plain HF checkpoint; import hf_nvfp4 to reload it converted)",
            f"  logs        {s['logs']}  (tensorboard --logdir {s['logs']})"
            if s.get("logs")
            else "  logs        none written (logging.report_to is empty); the loss curve is in summary.json",
        ]
    )
