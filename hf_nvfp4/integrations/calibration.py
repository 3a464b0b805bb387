"""Activation amax calibration for W4A4 export: a few batches through the model as trained.

Serving engines quantize a Linear's input with one fp32 tensor scale fixed at export time
(``input_global_scale`` / ``input_scale``), so the export needs each layer's input amax.
It is measured here by running the trained model (its NVFP4 forward, as in training) on a
few batches and keeping ``max |x|`` of every quantized layer's input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

CALIBRATION_BATCHES = 8  # "a few batches": enough for a max, cheap next to training
# The fewest tokens an activation amax is taken over: one NVFP4 block's worth. Fewer (an empty text
# becomes one </s> token) would fix every layer's input scale from a token or two, silently.
MIN_CALIBRATION_TOKENS = 16
TEXT_SEQ_LEN = 512
NEEDS_CALIBRATION = (
    "export_nvfp4: scheme 'NVFP4' (W4A4) quantizes activations with a tensor scale fixed at export time, so it "
    "needs calibration data: pass calibration= token-id tensors or batches (a recipe's: "
    "hf_nvfp4.data.calibration_batches('tiny-cpu')) or a text file (CLI: --calibration RECIPE_OR_TEXT_FILE); "
    "or export weights only with scheme='NVFP4A16'"
)


def calibration_batches(calibration, model: nn.Module, tokenizer=None, max_batches: int = CALIBRATION_BATCHES):
    """Turn what the user gave into a list of ``{"input_ids": LongTensor[B, T], ...}`` batches.

    calibration: a text file (tokenized with ``tokenizer`` into sequences of up to 512 tokens),
    a LongTensor of token ids ([B, T] or [T]), or batches: tensors or dicts holding
    ``input_ids`` (and optionally ``attention_mask``), e.g. ``hf_nvfp4.data.calibration_batches``
    of a recipe (which the CLI's ``--calibration RECIPE`` uses); or a function returning any of
    these. At most ``max_batches`` are used.
    """
    if calibration is None:
        raise ValueError(NEEDS_CALIBRATION)
    if callable(calibration):  # built on demand, once every cheaper check has passed (the CLI's recipes)
        calibration = calibration()
    if isinstance(calibration, (str, os.PathLike)):
        p = Path(calibration).expanduser()
        if not p.is_file() or p.suffix in (".yaml", ".yml"):
            raise ValueError(
                f"export_nvfp4: calibration {str(calibration)!r} is not a text file; for a recipe's data pass "
                "hf_nvfp4.data.calibration_batches(RECIPE) (the CLI's --calibration takes recipe names too)"
            )
        batches = _text_batches(p, tokenizer, model, max_batches)
    elif isinstance(calibration, torch.Tensor):
        batches = [{"input_ids": calibration}]
    elif isinstance(calibration, Iterable) and not isinstance(calibration, (bytes, dict)):
        batches = []
        for b in calibration:  # a DataLoader or a dataset works too: only the first few are read
            batches.append(b if isinstance(b, dict) else {"input_ids": b})
            if len(batches) >= max_batches:
                break
    else:
        raise TypeError(
            "export_nvfp4: calibration must be a text file, a tensor of token ids or a list of batches; "
            f"got {type(calibration).__name__}"
        )
    batches = [_check_batch(b, i, model) for i, b in enumerate(batches[:max_batches])]
    if not batches:
        raise ValueError("export_nvfp4: the calibration data holds no batch; give at least one sequence of token ids")
    n = calibration_tokens(batches)
    if n < MIN_CALIBRATION_TOKENS:
        what = f"calibration text {str(calibration)!r}" if isinstance(calibration, (str, os.PathLike)) else (
            "the calibration data")
        raise ValueError(
            f"export_nvfp4: {what} gives {n} token(s) of input; the activation amax needs at least "
            f"{MIN_CALIBRATION_TOKENS} (a few hundred give a steadier scale): give more text or batches"
        )
    return batches


def calibration_tokens(batches: list[dict]) -> int:
    """Tokens the model reads in ``batches`` (attention-masked padding not counted)."""
    n = 0
    for b in batches:
        mask = b.get("attention_mask")
        n += int(mask.sum()) if isinstance(mask, torch.Tensor) else b["input_ids"].numel()
    return n


def _check_batch(batch: dict, i: int, model: nn.Module) -> dict:
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    if isinstance(ids, (list, tuple)):  # rows of a datasets.Dataset
        ids = torch.as_tensor(ids)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise ValueError(f"export_nvfp4: calibration batch {i} needs input_ids as a non-empty integer tensor")
    ids = ids.long().reshape(1, -1) if ids.ndim == 1 else ids.long()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is not None and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        raise ValueError(
            f"export_nvfp4: calibration batch {i} has token ids outside the model's vocabulary [0, {vocab}); "
            "was it tokenized with another tokenizer?"
        )
    out = {"input_ids": ids}
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        out["attention_mask"] = batch["attention_mask"].reshape(ids.shape)
    return out


def _text_batches(path: Path, tokenizer, model: nn.Module, max_batches: int) -> list[dict]:
    if tokenizer is None:
        raise ValueError(
            f"export_nvfp4: calibration text {path} needs a tokenizer; pass tokenizer= (the CLI uses MODEL_DIR's)"
        )
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"))["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    if not [i for i in ids if i not in special]:  # an empty text is only the tokenizer's </s> or BOS
        raise ValueError(
            f"export_nvfp4: calibration text {path} holds no text (it encodes to special tokens only); give a file "
            f"of at least {MIN_CALIBRATION_TOKENS} tokens of text like the training data"
        )
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or TEXT_SEQ_LEN
    seq = max(1, min(TEXT_SEQ_LEN, int(limit)))
    chunks = [ids[i : i + seq] for i in range(0, len(ids), seq)][:max_batches]
    return [{"input_ids": torch.tensor(c)} for c in chunks if c]


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, names: list[str], batches: list[dict],
                         experts: list[str] = ()) -> dict[str, torch.Tensor]:
    """``max |x|`` (fp32 scalar) of the input of each module in ``names`` over ``batches``; for each
    experts module in ``experts``, of its up (gate_up) GEMM's input and of its down GEMM's input
    (the gate's output), keyed ``"{name}.gate_up_proj"`` (or ``.up_proj``) and ``"{name}.down_proj"``:
    one scale per MoE block, which is how vLLM reduces per-expert input scales (their max)."""
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    amax = {n: torch.zeros((), dtype=torch.float32) for n in names}
    hooks = []
    undo = []
    for n in experts:
        mod = modules[n]
        up = f"{n}.{'gate_up_proj' if getattr(mod, 'has_gate', True) else 'up_proj'}"
        amax[up] = amax[f"{n}.down_proj"] = torch.zeros((), dtype=torch.float32)
        hooks.append(mod.register_forward_pre_hook(_expert_hook(amax, up)))
        record = _expert_hook(amax, f"{n}.down_proj")
        if getattr(mod, "has_gate", True):
            gate = mod._apply_gate
            mod.__dict__["_apply_gate"] = lambda h, gate=gate, record=record: _recorded(record, gate(h))
            undo.append(mod)
        else:
            hooks.append(mod.act_fn.register_forward_hook(lambda _m, _a, y, record=record: record(None, (y,))))

    def hook(name):
        def fn(_mod, args):
            x = args[0]
            if x.numel():
                amax[name] = torch.maximum(amax[name], x.detach().abs().amax().float().cpu())

        return fn

    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(hook(n)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in tqdm(batches, desc="calibrating activation amax", unit="batch"):
            model(**{k: v.to(device) for k, v in b.items()})
    finally:
        for h in hooks:
            h.remove()
        for mod in undo:
            mod.__dict__.pop("_apply_gate", None)
        model.train(was_training)
    return amax


def _expert_hook(amax: dict, key: str):
    def fn(_mod, args):
        x = args[0]
        if x.numel():
            amax[key] = torch.maximum(amax[key], x.detach().abs().amax().float().cpu())

    return fn


def _recorded(record, y: torch.Tensor) -> torch.Tensor:
    record(None, (y,))
    return y
