"""A run's output directory: never overwritten unasked; resumed from its latest complete checkpoint.

``prepare_output_dir(dir, resume=..., overwrite=...)`` is what ``hf-nvfp4 train`` calls before
it builds anything: a directory that already holds a run is an error naming ``--resume`` and
``--overwrite``; ``resume`` picks the newest ``checkpoint-N`` whose files are all complete
(a truncated or partly written one is reported by name and skipped); ``overwrite`` deletes
the previous run's checkpoints and files (only those) and starts over.

>>> from hf_nvfp4.rundir import checkpoint_problem
>>> checkpoint_problem("no/such/dir")
'not a directory'
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path

from safetensors import SafetensorError, safe_open

logger = logging.getLogger("hf_nvfp4")
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
# what a finished or interrupted run leaves at the top of its output dir (train.py, Trainer.save_model)
RUN_FILES = (
    "trainer_state.json",
    "summary.json",
    "recipe.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "training_args.bin",
)
RUN_DIRS = ("logs",)  # TensorBoard events (deleted with --overwrite, not a marker on their own)


class RunDirError(ValueError):
    """The output directory cannot be used as asked (the CLI exits with code 2)."""


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` directories, newest (largest N) first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def existing_run(output_dir: str | os.PathLike) -> list[str]:
    """Names in ``output_dir`` that belong to a previous run (empty: nothing to protect)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return [p.name for p in checkpoints(d)] + [f for f in RUN_FILES if (d / f).exists()]


def _safetensors_problem(p: Path) -> str | None:
    """safetensors itself reads the header and checks that it covers the file exactly (no tensor loaded)."""
    try:
        with safe_open(str(p), framework="np"):
            return None
    except (SafetensorError, OSError) as exc:
        return f"{p.name} is truncated or unreadable ({exc})"


def _zip_problem(p: Path) -> str | None:
    """torch.save files are zip archives: a truncated one has lost its central directory."""
    size = p.stat().st_size
    try:
        with zipfile.ZipFile(p) as z:
            for info in z.infolist():
                if info.header_offset + info.compress_size > size:
                    return f"{p.name} is truncated"
    except (zipfile.BadZipFile, OSError, EOFError):
        return f"{p.name} is truncated or not a torch.save archive"
    return None


def checkpoint_problem(ckpt: str | os.PathLike) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None: every file is complete).

    Checks, cheaply (no tensor is loaded): trainer_state.json parses and has global_step;
    model weights exist; every safetensors file's header matches its size; every
    ``.pt``/``.pth``/``.bin`` file is a complete zip archive; every ``.json`` file parses.
    """
    d = Path(ckpt)
    if not d.is_dir():
        return "not a directory"
    state = d / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    why = _json_problem(state)
    if why:
        return why
    weights = [p for p in d.iterdir() if p.name.endswith(".safetensors") or p.name == "pytorch_model.bin"]
    if not weights:
        return "no model weights (model.safetensors)"
    for p in sorted(d.iterdir()):
        why = None
        if not p.is_file():
            continue
        if p.suffix == ".json":
            why = _json_problem(p)
        elif p.suffix == ".safetensors":
            why = _safetensors_problem(p)
        elif p.suffix in (".pt", ".pth", ".bin"):
            why = _zip_problem(p)
        if why:
            return why
    return None


def _json_problem(p: Path) -> str | None:
    try:
        data = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{p.name} is not valid JSON (truncated?)"
    if p.name == "trainer_state.json" and not (isinstance(data, dict) and "global_step" in data):
        return "trainer_state.json has no global_step"
    return None


def check_model_weights(model_dir: str | os.PathLike, what: str) -> None:
    """Raise :class:`RunDirError` naming the file if a model's weight file is truncated or unreadable.

    The same cheap checks as ``--resume`` (no tensor is loaded), for the commands that load a
    saved model (``eval``, ``diagnose``): a raw loader error would not name the file.
    """
    d = Path(model_dir)
    for p in sorted(d.iterdir()) if d.is_dir() else []:
        why = None
        if p.is_file() and p.suffix == ".safetensors":
            why = _safetensors_problem(p)
        elif p.is_file() and p.name == "pytorch_model.bin":
            why = _zip_problem(p)
        if why:
            raise RunDirError(f"{what}: cannot load {p}: {why}; re-save or copy the checkpoint again")


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint or None, [(name, why skipped), ...] for newer broken ones)."""
    skipped = []
    for ckpt in checkpoints(output_dir):
        why = checkpoint_problem(ckpt)
        if why is None:
            return ckpt, skipped
        skipped.append((ckpt.name, why))
    return None, skipped


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def prepare_output_dir(output_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> str | None:
    """Check (and with ``overwrite`` clear) ``output_dir``; returns the checkpoint to resume from, or None.

    Raises :class:`RunDirError` if the directory holds a run and neither flag is given, or if
    ``resume`` finds checkpoints but none is complete.
    """
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other; pick one")
    d = Path(output_dir)
    found = existing_run(d)
    if overwrite:
        if found and _is_main_process():
            for name in found + [n for n in RUN_DIRS if (d / n).exists()]:
                p = d / name
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            logger.warning("hf_nvfp4: --overwrite: removed the previous run in %s (%s)", d, ", ".join(found))
        return None
    if resume:
        ckpt, skipped = latest_complete_checkpoint(d)
        for name, why in skipped:
            logger.warning("hf_nvfp4: skipping %s: %s", d / name, why)
        if ckpt is not None:
            logger.warning("hf_nvfp4: resuming from %s", ckpt)
            return str(ckpt)
        if skipped:
            raise RunDirError(
                f"--resume: no complete checkpoint in {d} ("
                + "; ".join(f"{n}: {w}" for n, w in skipped)
                + "); pass --overwrite to start over"
            )
        if found:
            raise RunDirError(
                f"--resume: {d} holds a run ({', '.join(found)}) but no checkpoint-N to resume from "
                "(set training.save_steps to save some); pass --overwrite to start over"
            )
        logger.warning("hf_nvfp4: --resume: nothing to resume in %s; starting a new run", d)
        return None
    if found:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunDirError(
            f"output dir {d} already holds a run ({shown}); pass --resume to continue from its latest "
            "complete checkpoint, --overwrite to delete it and start over, or choose another --output-dir"
        )
    return None
