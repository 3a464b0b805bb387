"""lm-eval-harness on a live model or a saved checkpoint, offline tasks included.

The bundled tasks (``nvfp4_stdlib_ppl``: held-out perplexity, bits_per_byte;
``nvfp4_stdlib_mc``: four-way "which continuation is the real code") are materialised into
a cache directory with absolute data paths, so they run without network. Any other task
name passes through to lm-eval's own registry (those download their data).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import traceback
from pathlib import Path

import torch

from ..formats.registry import PRECISIONS
from ..nn.convert import require_converted, temporary_precision
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
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            if not ctx:  # an empty context: lm-eval's own rule (TemplateLM.loglikelihood) conditions on
                # prefix_token_id, or on the continuation's first token where that is the prefix token
                p = self.prefix_token_id
                ctx, cont = ([p], cont) if cont[:1] != [p] else (cont[:1], cont[1:])
            return ctx, cont

        def loglikelihood(self, requests, disable_tqdm=False):
            for req in requests:  # lm-eval would fail on these with a bare IndexError/AssertionError
                if req.args[1] == "":
                    raise ValueError(
                        f"lm-eval task {req.task_name!r}, document {req.doc_id}: a continuation (choice) is empty, "
                        f"which has no likelihood to score (context {req.args[0][-60:]!r}); give every choice "
                        "some text (check the task's doc_to_choice / doc_to_target)"
                    )
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            for key, _ctx, cont in requests:  # key: (context, continuation), None for rolling windows
                context, continuation = key if key is not None else ("", "")
                if not cont:
                    raise ValueError(
                        f"lm-eval: the continuation {continuation!r} (after context {context[-60:]!r}) encodes to no "
                        "token, so there is nothing to score; give every choice some text"
                    )
                if len(cont) > self.max_length:
                    raise ValueError(
                        f"lm-eval: a continuation of {len(cont)} tokens ({continuation[:40]!r}...) is longer than "
                        f"the model's maximum length of {self.max_length} tokens (config.max_position_embeddings); "
                        "lm-eval scores a whole continuation in one window and truncates only the context, so "
                        "shorten the task's continuations or evaluate with a longer context"
                    )
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

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


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records ``git describe`` with git's stderr open: outside a checkout that prints
    "fatal: not a git repository". Swap in the same lookup with stderr captured, restored after."""
    import lm_eval.evaluator as ev
    from lm_eval.loggers import utils as lu

    def git_hash():
        try:
            done = subprocess.run(["git", "describe", "--always"], capture_output=True, check=True)  # noqa: S607
            return done.stdout.decode().strip()
        except (subprocess.CalledProcessError, OSError):
            return lu.get_commit_from_path(os.getcwd())

    saved = ev.get_git_commit_hash
    ev.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        ev.get_git_commit_hash = saved


@contextlib.contextmanager
def _named_task_errors(tasks):
    """lm-eval reads ``choice[0]`` of the first document when it builds a task: an empty choice is a
    bare IndexError there. Say which tasks and what to fix."""
    try:
        yield
    except IndexError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        if not (frame.filename.endswith(os.path.join("lm_eval", "api", "task.py")) and "choice" in (frame.line or "")):
            raise
        raise ValueError(
            f"lm-eval could not build task(s) {list(tasks)}: a choice of the first document is empty "
            f"(lm-eval: {frame.line.strip()!r}); give every choice some text (check doc_to_choice)"
        ) from exc


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

    precision: evaluate the same weights with the forward (Fprop) numerics of this format
    (``"bf16"``, ``"nvfp4"``, ``"mxfp4"``, ...; one the model's recipe can run); None keeps each
    layer's current setting. The model's train/eval mode and precisions are restored afterwards.
    Under distributed training only the main process evaluates (lm-eval forces rank 0 / world
    size 1); the others return ``{}``.

    >>> res = evaluate_lm(model, tokenizer, ["nvfp4_stdlib_mc"], limit=20)   # doctest: +SKIP
    >>> res["results"]["nvfp4_stdlib_mc"]["acc,none"]                        # doctest: +SKIP
    """
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("evaluate_lm: give at least one task name")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"evaluate_lm: precision must be one of {PRECISIONS} or None, got {precision!r}")
    if tokenizer is None:
        raise ValueError(
            "evaluate_lm: tokenizer is None; pass the tokenizer the model was trained with "
            "(hf-nvfp4's recipes use the byte tokenizer: transformers.ByT5Tokenizer())"
        )
    if precision is not None:  # scores "in NVFP4" from a model that has no NVFP4 layer would be wrong
        require_converted(model, f"evaluate_lm(precision={precision!r}) (None evaluates the model as it is)")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return {}
    import lm_eval

    tm = _task_manager(tasks, include_path)
    was_training = model.training
    try:
        with temporary_precision(model, precision, scope="forward"):
            lm = _exact_hflm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            with torch.no_grad(), _quiet_git_hash(), _named_task_errors(tasks):
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
