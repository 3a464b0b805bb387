"""lm-eval-harness on a live model or a saved checkpoint, offline tasks included.

The bundled tasks (``nvfp4_stdlib_ppl``: held-out perplexity, bits_per_byte;
``nvfp4_stdlib_mc``: four-way "which continuation is the real code") are materialised into
a cache directory with absolute data paths, so they run without network. Any other task
name passes through to lm-eval's own registry (those download their data).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..nn.convert import require_converted
from ..nn.linear import NVFP4Linear
from ._trainer import TrainerBound
from .tokens import encode_pair, encode_prompt, encode_text

logger = logging.getLogger("hf_nvfp4")
TASK_SRC = Path(__file__).resolve().parent.parent / "tasks"
BUNDLED = ("nvfp4_stdlib_ppl", "nvfp4_stdlib_mc")
HEADLINE = ("acc_norm", "acc", "exact_match", "bits_per_byte", "word_perplexity")


def bundled_task_dir() -> Path:
    """A directory of the bundled task YAMLs, their data paths made absolute."""
    cache = Path(os.environ.get("HF_NVFP4_CACHE", Path.home() / ".cache" / "hf_nvfp4")) / "tasks"
    cache.mkdir(parents=True, exist_ok=True)
    for src in TASK_SRC.glob("*.yaml.in"):
        text = src.read_text().replace("@DATA@", str(TASK_SRC))
        dst = cache / src.name[: -len(".in")]
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
    return cache


_MANAGERS: dict = {}


def _manager(paths: list[str], defaults: bool):
    """lm-eval's TaskManager, cached: indexing its built-in registry takes seconds."""
    from lm_eval.tasks import TaskManager

    key = (tuple(paths), defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=paths, include_defaults=defaults)
    return _MANAGERS[key]


def _task_manager(tasks: list[str], include_path):
    paths = [str(bundled_task_dir())]
    if include_path is not None:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"include_path {str(p)!r} is not a directory of task YAMLs")
        paths.append(str(p))
    tm = _manager(paths, False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    tm = _manager(paths, True)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise ValueError(
            f"unknown lm-eval task(s) {missing}; looked in the bundled tasks ({', '.join(BUNDLED)} in "
            f"{paths[0]}), "
            + (f"your include_path {paths[1]}, " if include_path else "")
            + "and lm-eval's built-in registry"
        )
    return tm


def _exact_hflm():
    """lm-eval's HFLM with the tokenization rule of :mod:`.tokens` (one subclass, built lazily).

    HFLM encodes with the tokenizer's defaults, so a tokenizer that appends a special token
    (ByT5: ``</s>``) shifts every scored continuation by one token and scores ``</s>`` instead
    of its first character; rolling perplexity scores an extra ``</s>`` per document.
    """
    global _EXACT
    if _EXACT is not None:
        return _EXACT
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM

    class ExactHFLM(HFLM):
        def tok_encode(self, string, add_special_tokens=None, left_truncate_len=None, **kwargs):
            # rolling windows (None) start from prefix_token_id, so only an explicit True adds BOS
            ids = encode_prompt(self.tokenizer, string) if add_special_tokens else encode_text(self.tokenizer, string)
            return ids[-left_truncate_len:] if left_truncate_len else ids

        def _encode_pair(self, context, continuation):
            n = len(context) - len(context.rstrip())
            if n:  # lm-eval's convention: trailing spaces of the context belong to the continuation
                context, continuation = context[:-n], context[-n:] + continuation
            return encode_pair(self.tokenizer, context, continuation)

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            rows = [encode_prompt(self.tokenizer, s) for s in strings]
            if left_truncate_len:
                rows = [r[-left_truncate_len:] for r in rows]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
            ids, mask = [], []
            for r in rows:
                t, m = torch.tensor(r, dtype=torch.long), torch.ones(len(r), dtype=torch.long)
                spec = (width - len(r), 0) if padding_side == "left" else (0, width - len(r))
                ids.append(F.pad(t, spec, value=pad))
                mask.append(F.pad(m, spec, value=0))
            return torch.stack(ids), torch.stack(mask)

    _EXACT = ExactHFLM
    return _EXACT


_EXACT = None


def _set_precision(model, precision):
    saved = [(m, m.precision, m.forward_precision) for m in model.modules() if isinstance(m, NVFP4Linear)]
    if precision is not None:
        if precision not in ("nvfp4", "bf16") and not saved:
            raise ValueError(f"precision must be 'nvfp4', 'bf16' or None, got {precision!r}")
        for m, _, _ in saved:
            m.forward_precision = precision
    return saved


def headline_metrics(results: dict) -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` for every numeric metric of every task."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name = key.split(",")[0]
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and not name.endswith("_stderr") and name != "sample_len":
                out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def evaluate_lm(
    model,
    tokenizer,
    tasks,
    *,
    include_path=None,
    num_fewshot=None,
    limit=None,
    batch_size: int = 8,
    precision: str | None = None,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on a live model; returns lm-eval's results dict unchanged.

    Tokenization (any tokenizer): the context and the continuation are tokenized once each,
    with no special token between or after them; BOS leads the context only where the
    tokenizer's default call puts one (see :mod:`hf_nvfp4.integrations.tokens`).

    precision: evaluate the same weights with NVFP4 forward numerics (``"nvfp4"``) or BF16
    (``"bf16"``); None keeps each layer's current setting. The model's train/eval mode and
    precisions are restored afterwards. Under distributed training only the main process
    evaluates (lm-eval forces rank 0 / world size 1); the others return ``{}``.

    >>> res = evaluate_lm(model, tokenizer, ["nvfp4_stdlib_mc"], limit=20)   # doctest: +SKIP
    >>> res["results"]["nvfp4_stdlib_mc"]["acc,none"]                        # doctest: +SKIP
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("evaluate_lm: give at least one task name")
    if precision not in (None, "nvfp4", "bf16"):
        raise ValueError(f"evaluate_lm: precision must be 'nvfp4', 'bf16' or None, got {precision!r}")
    if precision is not None:  # scores "in NVFP4" from a model that has no NVFP4 layer would be wrong
        require_converted(model, f"evaluate_lm(precision={precision!r}) (None evaluates the model as it is)")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}
    import lm_eval

    tm = _task_manager(tasks, include_path)
    was_training = model.training
    saved = _set_precision(model, precision)
    try:
        lm = _exact_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with torch.no_grad():
            res = lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                log_samples=False,
                bootstrap_iters=0,
            )
    finally:
        for m, p, fp in saved:
            m.precision, m.forward_precision = p, fp
        model.train(was_training)
    return res


class LMEvalCallback(TrainerBound):
    """Run lm-eval during training and log each task's metrics as ``lm_eval/<task>/<metric>``.

    Every ``every_n_steps`` steps and/or on each Trainer evaluation (``on_evaluate=True``).
    Values go through ``trainer.log`` so they reach log_history and every report_to
    integration. Skipped, with a warning, under FSDP (lm-eval runs on one process, a sharded
    model needs all of them).

    >>> from hf_nvfp4 import LMEvalCallback
    >>> cb = LMEvalCallback(["nvfp4_stdlib_mc"], every_n_steps=500, limit=100)
    """

    def __init__(
        self,
        tasks,
        every_n_steps: int | None = None,
        *,
        on_evaluate: bool = False,
        tokenizer=None,
        include_path=None,
        num_fewshot=None,
        limit=None,
        batch_size: int = 8,
        precision: str | None = None,
    ):
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("LMEvalCallback: give at least one task")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"LMEvalCallback: every_n_steps must be >= 1, got {every_n_steps}")
        if every_n_steps is None and not on_evaluate:
            raise ValueError("LMEvalCallback: set every_n_steps, on_evaluate=True, or both")
        self.tasks, self.every, self.on_eval = list(tasks), every_n_steps, on_evaluate
        self.kw = dict(
            include_path=include_path, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, precision=precision
        )
        self.tokenizer, self.trainer, self.history = tokenizer, None, []
        _task_manager(self.tasks, include_path)  # unknown tasks fail now, not hours into training

    def _run(self, args, state, control, model, processing_class=None):
        if getattr(self.trainer, "is_fsdp_enabled", False) or getattr(model, "_is_fsdp_managed_module", False):
            logger.warning("hf_nvfp4: LMEvalCallback skipped under FSDP; evaluate the saved checkpoint instead")
            return
        tok = self.tokenizer or processing_class
        if tok is None:
            raise ValueError("LMEvalCallback needs a tokenizer: pass tokenizer= or give the Trainer processing_class=")
        res = evaluate_lm(model, tok, self.tasks, **self.kw)
        metrics = headline_metrics(res) if res else {}
        if metrics:
            self.history.append((state.global_step, metrics))
            self.log_metrics(args, state, control, metrics)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._run(args, state, control, model, processing_class)

    def on_evaluate(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.on_eval:
            self._run(args, state, control, model, processing_class)
