"""Run files: YAML data (never code) describing one training run, validated strictly.

Users call them recipes (``hf-nvfp4 recipes``, ``hf-nvfp4 train RECIPE``, the ``recipes/``
folder). In the code a run file is a :class:`RunSpec`, and "recipe" is the frozen numerics recipe
(:class:`~hf_nvfp4.NVFP4Recipe`), which a run file carries under ``nvfp4:`` (as an
:class:`~hf_nvfp4.NVFP4Config`). The field types of the dataclasses below are the schema.

An unknown or mistyped key is an error that names it and lists the valid ones. Loading uses
``yaml.safe_load``; ``trust_remote_code`` stays off unless the recipe sets it; the network
is used only when the recipe names a hub source (a model, tokenizer or dataset that is not
a local path).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # imported when a run file is built: listing recipes needs no transformers
    from .integrations.config import NVFP4Config

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"  # inside the package: wheels ship them


class RecipeError(ValueError):
    """A recipe file that cannot be used as written."""


@dataclass
class ModelSection:
    name_or_path: str | None = None  # hub id or local directory: from_pretrained
    config: dict[str, Any] | None = None  # architecture config ({model_type: llama, ...}): from scratch
    trust_remote_code: bool = False
    dtype: str = "float32"  # master weights


@dataclass
class TokenizerSection:
    kind: str = "byte"  # "byte": ByT5's byte tokenizer, built offline; "auto": AutoTokenizer
    name_or_path: str | None = None


@dataclass
class DataSection:
    source: str = "stdlib"  # "stdlib" (Python's own sources), "files" or "hub"
    name: str | None = None  # hub dataset name
    config_name: str | None = None
    split: str = "train"
    streaming: bool = False
    files: list[str] = field(default_factory=list)  # local files or globs
    format: str = "text"  # text | json | parquet (files)
    text_field: str = "text"
    seq_len: int = 256
    max_files: int = 400  # stdlib: how many source files
    eval_fraction: float = 0.02


@dataclass
class TrainingSection:
    max_steps: int = 200
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # warmup-stable-decay: the last 20% of steps decay
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = True
    logging_steps: int = 10
    save_steps: int = 0  # 0: only at the end
    eval_steps: int = 0
    dataloader_workers: int = 0


@dataclass
class PrecisionSwitchSection:
    at: Any = None  # fraction of max_steps (0-1), a step (int), or tokens ("8.2T")
    to: str = "bf16"
    scope: str = "all"


@dataclass
class ShadowSection:
    enabled: bool = False
    mode: str = "lockstep"  # lockstep | reference
    format: str = "fp8_block"
    reference: str | None = None  # reference mode: trainer_state.json or CSV of a finished run


@dataclass
class EvaluationSection:
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    every_n_steps: int = 0
    limit: int | None = None
    batch_size: int = 8


@dataclass
class LoggingSection:
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str | None = None
    run_name: str | None = None
    health_every_n_steps: int = 0  # > 0: log weight quantization health (QuantHealthCallback)


def _nvfp4_config(**fields) -> NVFP4Config:
    from .integrations.config import NVFP4Config

    return NVFP4Config(**fields)


@dataclass
class RunSpec:
    """One training run, as a run file (YAML, "recipe" to users) describes it."""

    name: str = "recipe"
    output_dir: str = "runs/recipe"
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    nvfp4: NVFP4Config | None = field(default_factory=_nvfp4_config)  # null: train in plain BF16
    precision_switch: PrecisionSwitchSection = field(default_factory=PrecisionSwitchSection)
    fp8_shadow: ShadowSection = field(default_factory=ShadowSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def needs_network(self) -> list[str]:
        """The hub sources this recipe names (empty: runs fully offline)."""
        out = []
        for what, name in (("model", self.model.name_or_path), ("tokenizer", self.tokenizer.name_or_path)):
            if name and not Path(name).expanduser().exists():
                out.append(f"{what} {name}")
        if self.data.source == "hub":
            out.append(f"dataset {self.data.name}")
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.nvfp4 is not None:
            d["nvfp4"] = {k: v for k, v in self.nvfp4.to_dict().items() if k != "quant_method"}
        return d

def _build(cls, data: Any, where: str):
    from .integrations.config import NVFP4Config  # here: listing recipes needs no transformers

    if cls is NVFP4Config:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise RecipeError(f"{where} must be a mapping of NVFP4Config fields, got {type(data).__name__}")
        try:
            return NVFP4Config.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise RecipeError(f"{where}: {exc}") from None
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    hints = typing.get_type_hints(cls, localns={"NVFP4Config": NVFP4Config})
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            valid = ", ".join(f.name for f in fields(cls))
            raise RecipeError(f"unknown key {where}.{key}; valid keys of {where} are: {valid}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is None and isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(tp, value: Any, where: str):
    """Check ``value`` against a field's type (``int | None``, ``list[str]``, a section, ...)."""
    union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    options = typing.get_args(tp) if union else (tp,)
    from .integrations.config import NVFP4Config

    section = next((o for o in options if o is NVFP4Config or dataclasses.is_dataclass(o)), None)
    if section is not None:
        return _build(section, value, where)
    if value is None:
        if type(None) in options or Any in options:
            return None
        raise RecipeError(f"{where} may not be null (expected {_type_name(tp)})")
    for opt in options:
        origin = typing.get_origin(opt) or opt
        if opt is Any:
            return value
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if origin is dict and isinstance(value, dict):
            return value
        if origin is list:
            items = [value] if isinstance(value, str) else value
            if isinstance(items, list) and all(isinstance(v, str) for v in items):
                return items
    raise RecipeError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A file path, or the name of a shipped recipe (``tiny-cpu``)."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    for cand in (RECIPE_DIR / f"{name_or_path}.yaml", RECIPE_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    shipped = sorted(x.stem for x in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.is_dir() else []
    raise RecipeError(f"no recipe file {name_or_path!r}; give a path to a YAML file or one of: {', '.join(shipped)}")


def load_recipe(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> RunSpec:
    """Read and validate a recipe; ``overrides`` are ``section.key=value`` strings (YAML values).

    >>> from hf_nvfp4.recipe import load_recipe
    >>> load_recipe("tiny-cpu").training.max_steps > 0
    True
    """
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not a text (UTF-8 YAML) file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:  # e.g. a !!python/... tag: safe_load refuses it
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RecipeError(f"override {item!r}: the value is not plain YAML data ({msg})") from None
    data.setdefault("name", path.stem)
    recipe = _build(RunSpec, data, "recipe")
    _check(recipe)
    return recipe


def _check(r: RunSpec) -> None:
    if (r.model.name_or_path is None) == (r.model.config is None):
        raise RecipeError("recipe.model needs exactly one of name_or_path (pretrained) or config (from scratch)")
    if r.model.config is not None and "model_type" not in r.model.config:
        raise RecipeError("recipe.model.config needs a model_type (e.g. llama, qwen2, nemotron_h)")
    if r.tokenizer.kind not in ("byte", "auto"):
        raise RecipeError(f"recipe.tokenizer.kind must be 'byte' or 'auto', got {r.tokenizer.kind!r}")
    if r.tokenizer.kind == "auto" and not (r.tokenizer.name_or_path or r.model.name_or_path):
        raise RecipeError("recipe.tokenizer.kind 'auto' needs tokenizer.name_or_path (or a pretrained model)")
    if r.data.source not in ("stdlib", "files", "hub"):
        raise RecipeError(f"recipe.data.source must be stdlib, files or hub, got {r.data.source!r}")
    if r.data.source == "hub" and not r.data.name:
        raise RecipeError("recipe.data.source 'hub' needs data.name")
    if r.data.source == "files" and not r.data.files:
        raise RecipeError("recipe.data.source 'files' needs data.files")
    if r.data.format not in ("text", "json", "parquet"):
        raise RecipeError(f"recipe.data.format must be text, json or parquet, got {r.data.format!r}")
    _check_unused_data_keys(r.data)
    _check_ranges(r)
    if r.precision_switch.scope not in ("all", "forward", "backward"):
        raise RecipeError("recipe.precision_switch.scope must be 'all', 'forward' or 'backward'")
    if r.fp8_shadow.mode not in ("lockstep", "reference"):
        raise RecipeError("recipe.fp8_shadow.mode must be 'lockstep' or 'reference'")
    if r.model.dtype not in DTYPES:
        raise RecipeError(
            f"recipe.model.dtype must be one of {', '.join(DTYPES)} (master weights), got {r.model.dtype!r}"
        )
    _check_callbacks(r)


DTYPES = ("float32", "bfloat16", "float16")
INF = float("inf")
# Every numeric recipe key: (section, key, low, high, low included, high included, why). NaN never passes.
RANGES = (
    ("data", "seq_len", 16, INF, True, True, ""),
    ("data", "max_files", 1, INF, True, True, ""),
    ("data", "eval_fraction", 0, 1, True, False, "0 keeps no held-out set"),
    ("training", "max_steps", 1, INF, True, True, ""),
    ("training", "batch_size", 1, INF, True, True, "per device"),
    ("training", "grad_accum", 1, INF, True, True, ""),
    ("training", "lr", 0, INF, False, False, "the peak learning rate"),
    ("training", "min_lr_ratio", 0, 1, True, True, "a fraction of lr"),
    ("training", "warmup_steps", 0, INF, True, True, ""),
    ("training", "decay_fraction", 0, 1, True, True, "a fraction of max_steps"),
    ("training", "beta1", 0, 1, True, False, "Adam's momentum"),
    ("training", "beta2", 0, 1, True, False, "Adam's second-moment decay"),
    ("training", "weight_decay", 0, INF, True, False, ""),
    ("training", "grad_clip", 0, INF, True, False, "0 turns clipping off"),
    ("training", "seed", 0, 2**32 - 1, True, True, ""),
    ("training", "logging_steps", 1, INF, True, True, ""),
    ("training", "save_steps", 0, INF, True, True, "0 saves only at the end"),
    ("training", "eval_steps", 0, INF, True, True, "0: no periodic evaluation"),
    ("training", "dataloader_workers", 0, INF, True, True, ""),
    ("evaluation", "every_n_steps", 0, INF, True, True, "0: only at the end"),
    ("evaluation", "limit", 1, INF, True, True, "examples per task, or null for all"),
    ("evaluation", "batch_size", 1, INF, True, True, ""),
    ("logging", "health_every_n_steps", 0, INF, True, True, "0 turns it off"),
)


def _check_ranges(r: RunSpec) -> None:
    """Bound every numeric key at load: a NaN lr or a beta1 of 2 fails here, naming the key."""
    for section, key, low, high, low_in, high_in, why in RANGES:
        v = getattr(getattr(r, section), key)
        if v is None:
            continue
        above = v >= low if low_in else v > low
        below = v <= high if high_in else v < high
        if not (above and below):  # False for NaN too
            lo, hi = ("[" if low_in else "("), ("]" if high_in else ")")
            if high == INF:
                bound = f">= {low}" if low_in else f"> {low}"
            else:
                bound = f"within {lo}{low}, {high}{hi}"
            if high == INF and not high_in:
                bound += " and finite"
            raise RecipeError(f"recipe.{section}.{key} must be {bound}{f' ({why})' if why else ''}, got {v!r}")


# Keys that only one data source reads: set with another source they would be silently ignored.
_SOURCE_KEYS = {"files": ("files",), "name": ("hub",), "config_name": ("hub",), "streaming": ("hub",),
                "format": ("files",), "text_field": ("files", "hub"), "max_files": ("stdlib",)}


def _check_unused_data_keys(d: DataSection) -> None:
    for key, sources in _SOURCE_KEYS.items():
        if d.source not in sources and getattr(d, key) != getattr(DataSection, key, None) and getattr(d, key) != []:
            raise RecipeError(
                f"recipe.data.{key} is set ({getattr(d, key)!r}) but data.source {d.source!r} does not read it "
                f"(only {' or '.join(repr(s) for s in sources)} does); remove it or change data.source"
            )


def _check_callbacks(r: RunSpec) -> None:
    """Build the callback sections' objects now: a bad value fails at load, not after data and model."""
    from .integrations.callbacks import PrecisionSwitchCallback
    from .integrations.shadow import FP8ShadowCallback

    ps, sh = r.precision_switch, r.fp8_shadow
    if ps.at is None and (ps.to, ps.scope) != (PrecisionSwitchSection.to, PrecisionSwitchSection.scope):
        raise RecipeError(
            "recipe.precision_switch sets to/scope but not at (a fraction, a step or tokens): nothing would switch"
        )
    if ps.at is not None and r.nvfp4 is None:
        raise RecipeError(
            "recipe.precision_switch needs an nvfp4 section (with nvfp4: null nothing is NVFP4 to switch)"
        )
    try:
        PrecisionSwitchCallback(0.5 if ps.at is None else ps.at, to=ps.to, scope=ps.scope)
    except ValueError as exc:
        raise RecipeError(f"recipe.precision_switch: {exc}") from None
    try:
        if sh.enabled:
            FP8ShadowCallback(sh.mode, format=sh.format, reference=sh.reference)
        else:  # the values are checked even while it is off, so turning it on later cannot fail late
            FP8ShadowCallback(format=sh.format)
    except (ValueError, OSError) as exc:
        raise RecipeError(f"recipe.fp8_shadow: {exc}") from None
