"""Tokenizers and datasets for recipes: byte-level tokenization and packing with datasets.map."""

from __future__ import annotations

import glob
import sysconfig
from pathlib import Path

from .recipe import RecipeError, RunSpec


def build_tokenizer(recipe: RunSpec):
    """ByT5's byte tokenizer (no files, no network), or AutoTokenizer for ``kind: auto``."""
    if recipe.tokenizer.kind == "byte":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer()
    from transformers import AutoTokenizer

    name = recipe.tokenizer.name_or_path or recipe.model.name_or_path
    kwargs = {"trust_remote_code": True} if recipe.model.trust_remote_code else {}
    return AutoTokenizer.from_pretrained(name, **kwargs)


def stdlib_files(max_files: int) -> list[str]:
    """Python standard-library sources: real text that exists on every machine (sorted, so runs repeat)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "site-packages", "idlelib", "lib2to3", "__pycache__", "turtledemo")
    files = [p for p in sorted(root.rglob("*.py")) if not any(part in skip for part in p.relative_to(root).parts)]
    if not files:
        raise RecipeError(f"found no Python sources under {root} for data.source 'stdlib'")
    return [str(p) for p in files[:max_files]]


def _local_files(patterns: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        hits = sorted(glob.glob(str(Path(pat).expanduser()), recursive=True))
        if not hits:
            raise RecipeError(f"data.files: {pat!r} matches no file")
        out += hits
    return out


def build_datasets(recipe: RunSpec, tokenizer, main_process_first=None):
    """(train, eval or None): text tokenized and packed into ``seq_len`` blocks with labels."""
    import datasets

    d = recipe.data
    if d.source == "hub":
        raw = datasets.load_dataset(
            d.name,
            d.config_name,
            split=d.split,
            streaming=d.streaming,
            trust_remote_code=recipe.model.trust_remote_code or None,
        )
    else:
        files = stdlib_files(d.max_files) if d.source == "stdlib" else _local_files(d.files)
        kind = "text" if d.source == "stdlib" else d.format
        kw = {"sample_by": "document"} if kind == "text" else {}
        raw = datasets.load_dataset(kind, data_files={"train": files}, split="train", **kw)
    text_field = "text" if d.source == "stdlib" else d.text_field
    cols = list(raw.column_names or []) if hasattr(raw, "column_names") else []
    if cols and text_field not in cols:
        raise RecipeError(f"data.text_field {text_field!r} is not a column of the dataset; columns are {cols}")
    seq = d.seq_len

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[text_field], add_special_tokens=True)["input_ids"]}

    def pack(batch):
        flat = [t for ids in batch["input_ids"] for t in ids]
        n = len(flat) // seq * seq
        blocks = [flat[i : i + seq] for i in range(0, n, seq)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    map_kw = {} if d.streaming else {"desc": "tokenizing", "num_proc": None}
    tok = raw.map(tokenize, batched=True, remove_columns=cols or None, **map_kw)
    if not d.streaming:
        map_kw["desc"] = f"packing into {seq}-token blocks"
    packed = tok.map(pack, batched=True, **map_kw)
    if d.streaming or d.eval_fraction <= 0:
        return packed, None
    if len(packed) < 2:
        raise RecipeError(f"the data makes only {len(packed)} block(s) of {seq} tokens; add data or lower seq_len")
    split = packed.train_test_split(test_size=max(1, int(len(packed) * d.eval_fraction)), seed=recipe.training.seed)
    return split["train"], split["test"]


def calibration_batches(recipe: RunSpec | str, max_batches: int = 8) -> list[dict]:
    """A few batches of a recipe's data (its held-out split if it has one), for W4A4 export calibration.

    ``recipe``: a RunSpec, a shipped recipe's name or a YAML path. Returns ``[{"input_ids": [B, T]}, ...]``
    (B = the recipe's batch size), ready for ``hf_nvfp4.export_nvfp4(..., calibration=...)``.
    """
    import torch

    from .recipe import load_recipe

    if not isinstance(recipe, RunSpec):
        recipe = load_recipe(recipe)
    train, held_out = build_datasets(recipe, build_tokenizer(recipe))
    ds = held_out if held_out is not None and len(held_out) > 0 else train
    bs, rows = recipe.training.batch_size, []
    for row in ds:  # streaming datasets too
        rows.append(row["input_ids"])
        if len(rows) >= bs * max_batches:
            break
    return [{"input_ids": torch.tensor(rows[i : i + bs])} for i in range(0, len(rows), bs)]
