"""Export a model trained with the NVFP4 recipe to NVFP4 serving checkpoints.

Train in NVFP4, serve in NVFP4: the codes and E4M3 scales written are the training-time
Fprop weight quantization, ``quantize_nvfp4(W, tile=(16, 16))``. A 16x16 tile's scale is
stored on each of its 16 rows, which is exactly the 1x16 layout serving engines read, so
for every layer an engine runs alone the served weights are bit for bit the ones the model
computed with in training. Engines run q/k/v and gate/up as one GEMM with one tensor scale:
a model trained with ``fused_global_scale=True`` already shared it, so every layer is written
bit-identical to training; otherwise those siblings are quantized with their joint amax, and the
report says, per layer, whether it is bit-identical and how far it moved. MoE experts are
written per expert (:mod:`hf_nvfp4.integrations.export_experts`). Layouts and scale directions:
:mod:`hf_nvfp4.integrations.serving_formats`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..formats.e2m1 import unpack_nibbles
from ..formats.nvfp4 import quantize_nvfp4
from ..nn.convert import plan_conversion
from ..nn.fused import FUSED_SIBLINGS, find_fused_groups
from ..nn.linear import NVFP4Linear
from ..ops.roles import quantizer_for
from . import export_experts as ex
from .serving_formats import FORMATS, SCHEMES, layer_tensors, quant_config, write_safetensors

__all__ = ["FUSED_SIBLINGS", "ExportReport", "export_nvfp4", "fused_groups"]
REPORT_FILE = "nvfp4_export.json"
_WRITTEN = ("config.json", "hf_quant_config.json", "generation_config.json", REPORT_FILE)
_WRITTEN += ("model.safetensors.index.json",)


@dataclass
class ExportReport:
    """What :func:`export_nvfp4` wrote and how it relates to the training-time numerics."""

    save_directory: str
    format: str
    scheme: str
    quantized: list[str] = field(default_factory=list)
    high_precision: dict[str, str] = field(default_factory=dict)  # module -> why it stays high precision
    fused: dict[str, dict] = field(default_factory=dict)  # module -> its group, amax and how far it moved
    # every NVFP4 layer (experts: per experts module) -> bit_identical to training, worst per-element change
    layers: dict[str, dict] = field(default_factory=dict)
    experts: dict[str, dict] = field(default_factory=dict)  # experts module -> count, checkpoint names
    input_amax: dict[str, float] = field(default_factory=dict)  # W4A4: calibrated activation amax
    calibration_batches: int = 0
    calibration_tokens: int = 0
    bytes_written: int = 0  # safetensors files on disk
    payload_bytes: int = 0  # their tensor bytes
    bf16_bytes: int = 0  # the same tensors as a BF16 checkpoint
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        moved = {k: v for k, v in self.fused.items() if not v["identical"]}
        worst = max(moved.values(), key=lambda v: v["rel_change"], default=None)
        same = [k for k, v in self.layers.items() if v["bit_identical"]]
        n_exp = sum(v["experts"] for v in self.experts.values())
        lines = [
            f"hf-nvfp4 export: {self.format} / {self.scheme} -> {self.save_directory}",
            f"  {len(self.quantized)} Linear layers in NVFP4"
            + (f", {n_exp} experts in {len(self.experts)} MoE blocks" if self.experts else "")
            + f"; kept high precision: {len(self.high_precision)} modules",
            f"  weights {self.payload_bytes / 2**20:.2f} MiB vs {self.bf16_bytes / 2**20:.2f} MiB as BF16 "
            f"({self.payload_bytes / max(self.bf16_bytes, 1):.3f}x; files {self.bytes_written / 2**20:.2f} MiB)",
            f"  bit-identical to the weights training computed with: {len(same)} of {len(self.layers)} layers"
            + (" (experts counted per MoE block)" if self.experts else ""),
        ]
        far = max((v for v in self.layers.values() if not v["bit_identical"]), key=lambda v: v["max_rel_change"],
                  default=None)
        if far:
            name = next(k for k, v in self.layers.items() if v is far)
            lines.append(
                f"  worst per-element change: {far['max_abs_change']:.3g} ({far['max_rel_change']:.3g} of the layer's "
                f"max |w|) in {name}; train with fused_global_scale=True to serve exactly what you trained"
            )
        if worst:
            lines.append(
                f"  {len(moved)} fused siblings requantized with their group's joint amax: largest change "
                f"{worst['rel_change']:.3g} (relative, {worst['changed_fraction']:.1%} of codes); their quantization "
                f"error vs the master weights {worst['rel_error_training']:.3g} -> {worst['rel_error_exported']:.3g}"
            )
        if self.calibration_batches:
            lines.append(
                f"  activation amax calibrated on {self.calibration_batches} batches ({self.calibration_tokens} tokens)"
            )
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def export_nvfp4(
    model,
    save_directory: str | os.PathLike,
    *,
    format: str = "compressed-tensors",
    scheme: str = "NVFP4A16",
    calibration=None,
    tokenizer=None,
) -> ExportReport:
    """Write an NVFP4 serving checkpoint of a model trained with the NVFP4 recipe.

    model: a converted model (any NVFP4Linear inside) or a checkpoint directory saved by this
        plugin (config.json with ``quant_method: hf_nvfp4``).
    format: ``"compressed-tensors"`` (``nvfp4-pack-quantized``: vLLM, and transformers with
        compressed-tensors installed) or ``"modelopt"`` (NVIDIA ModelOpt's layout).
    scheme: ``"NVFP4A16"`` (NVFP4 weights, high-precision activations) or ``"NVFP4"`` (W4A4:
        activations too, with tensor scales calibrated on ``calibration``).
    calibration: ``"NVFP4"`` only: token-id tensors or batches (a recipe's data:
        ``hf_nvfp4.data.calibration_batches("tiny-cpu")``), or a text file tokenized with
        ``tokenizer``; at most 8 batches are used.
    tokenizer: saved with the checkpoint; by default the one in the model's directory, if any.

    ``save_directory`` must be new or empty. High-precision tensors are written in bf16.
    Returns an :class:`ExportReport`, also written to ``nvfp4_export.json``.

    >>> import hf_nvfp4, tempfile
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, vocab_size=256)
    >>> model = hf_nvfp4.from_config(cfg, hf_nvfp4.NVFP4Config(bf16_last_blocks=0))
    >>> with tempfile.TemporaryDirectory() as out:
    ...     report = hf_nvfp4.export_nvfp4(model, out)
    >>> len(report.quantized), sorted(report.high_precision)
    (14, ['lm_head', 'model.embed_tokens'])
    """
    return export_to_directory(model, save_directory, format, scheme, calibration, tokenizer, overwrite=False)



def export_to_directory(model, save_directory, fmt, scheme, calibration, tokenizer, overwrite: bool) -> ExportReport:
    """:func:`export_nvfp4`, with ``overwrite`` (the CLI's ``--overwrite``) replacing an earlier export."""
    _check_choices(fmt, scheme, calibration)
    out = Path(save_directory).expanduser()
    _check_dir(out, overwrite)  # before any costly step
    model, source = _load(model)
    names, experts = _quantized_names(model)
    _check_finite(model, names)
    _ensure_fused_groups(model)
    ckpt = ex.checkpoint_names_or_own(model, experts)
    report = ExportReport(str(out), fmt, scheme, quantized=names)
    groups = _classify(model, names, experts, report)
    if tokenizer is None and source is not None:
        tokenizer = _find_tokenizer(source)
    act_amax = _calibrate(model, names, experts, groups, calibration, tokenizer, report) if scheme == "NVFP4" else None
    _prepare_dir(out, overwrite)  # every check is done: nothing is touched before here

    q = _quantize_layers(model, names, groups, report)
    qe = {n: ex.quantize_experts(m) for n, m in experts.items()}
    for n in experts:  # the operands training used, per expert: nothing moves
        names_n = ex.expert_module_names(model, ckpt, n)
        report.experts[n] = {"experts": len(next(iter(qe[n].values()))), "matrices": len(names_n),
                             "checkpoint_names": names_n[:3] + (["..."] if len(names_n) > 3 else [])}
        report.layers[n] = {"bit_identical": True, "max_abs_change": 0.0, "max_rel_change": 0.0}
    by_src: dict[str, list[tuple[str, int | None, int | None]]] = {}
    for key, (src, e, half) in ckpt.items():
        by_src.setdefault(src, []).append((key, e, half))
    dtype = torch.float16 if {p.dtype for p in model.parameters()} == {torch.float16} else torch.bfloat16
    tensors, hp, stored, bf16 = {}, {}, set(), 0
    for key, t in model.state_dict().items():
        mod, _, leaf = key.rpartition(".")
        act = None if act_amax is None else act_amax.get(key if mod in qe else mod)
        if (mod in q and leaf == "weight") or (mod in qe and leaf in qe[mod]):
            bf16 += 2 * t.numel()
            keys = by_src.get(key, [(key, None, None)])
            for ck, e, half in keys:
                halves = sum(e2 == e for _, e2, _ in keys)  # gate_up: gate and up share the expert's scale
                qt = q[mod] if e is None else ex.split_rows(qe[mod][leaf][e], half, halves)
                tensors.update(layer_tensors(fmt, ck.removesuffix(".weight"), qt, act))
        elif t.data_ptr() not in stored or not t.numel():  # tied weights (lm_head = embed) are stored once
            stored.add(t.data_ptr())
            bf16 += 2 * t.numel() if t.is_floating_point() else t.numel() * t.element_size()
            t = t.detach().cpu()
            hp[key] = (t.to(dtype) if t.is_floating_point() else t).clone()
    tensors.update(ex.revert(model, hp, ckpt))
    report.bf16_bytes = bf16
    report.payload_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    report.bytes_written = write_safetensors(tensors, out)
    ignore = ex.checkpoint_modules(report.high_precision, by_src)
    _write_configs(model, out, fmt, scheme, dtype, report, ignore)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    else:
        report.notes.append("no tokenizer given or found next to the model: add one before serving")
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


@torch.no_grad()
def _check_finite(model: nn.Module, names: list[str]) -> None:
    """Refuse NaN/Inf weights before anything is written: a NaN weight gives its layer NaN scales and
    all-zero codes, an Inf one garbage; both would export with exit code 0."""
    bad = []
    for pname, p in model.named_parameters():
        if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
            nan, inf = int(torch.isnan(p).sum()), int(torch.isinf(p).sum())
            layer = pname.rpartition(".")[0]
            kind = "NVFP4 layer" if layer in names else "high-precision tensor"
            bad.append(f"{pname} ({kind}: {nan} NaN, {inf} Inf of {p.numel()})")
    if bad:
        raise ValueError(
            f"export_nvfp4: the model has non-finite weights in {len(bad)} tensor(s): {'; '.join(bad[:5])}"
            f"{'; ...' if len(bad) > 5 else ''}. Training diverged or the checkpoint is damaged; export an earlier "
            "checkpoint (nothing was written)"
        )


def _check_choices(fmt, scheme, calibration) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"export_nvfp4: unknown format {fmt!r}; use one of {list(FORMATS)}")
    if scheme not in SCHEMES:
        raise ValueError(f"export_nvfp4: unknown scheme {scheme!r}; use 'NVFP4A16' (weights only) or 'NVFP4' (W4A4)")
    if scheme == "NVFP4" and calibration is None:
        from .calibration import NEEDS_CALIBRATION

        raise ValueError(NEEDS_CALIBRATION)
    if scheme == "NVFP4A16" and calibration is not None:
        raise ValueError("export_nvfp4: calibration data is used by scheme='NVFP4' (W4A4) only; drop it or switch")


def _load(model_or_dir):
    """(model, its directory or None). A directory must hold a checkpoint saved by this plugin."""
    if isinstance(model_or_dir, nn.Module):
        return model_or_dir, None
    if not isinstance(model_or_dir, (str, os.PathLike)):
        raise TypeError(f"export_nvfp4: model must be a model or a directory, got {type(model_or_dir).__name__}")
    path = Path(model_or_dir).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"export_nvfp4: {path} is not a model directory (no config.json); give the output_dir of an "
            "hf-nvfp4 training run or a directory written by save_pretrained"
        )
    qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "hf_nvfp4":
        raise ValueError(
            f"export_nvfp4: {path} was not trained with hf_nvfp4 (its config.json quant_method is "
            f"{qc.get('quant_method')!r}, not 'hf_nvfp4'), so it has no training-time NVFP4 quantization to export"
        )
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto"), path


def _recipe(mod: NVFP4Linear):
    return mod.nvfp4_state.recipe


def _quantized_names(model: nn.Module) -> tuple[list[str], dict[str, nn.Module]]:
    """(names of the NVFP4 Linear layers, the experts modules that trained in NVFP4)."""
    if not callable(getattr(getattr(model, "config", None), "to_dict", None)):
        raise TypeError(
            f"export_nvfp4: writes Hugging Face checkpoints, so model must be a transformers model (with a .config); "
            f"got {type(model).__name__}"
        )
    names = [n for n, m in model.named_modules() if isinstance(m, NVFP4Linear)]
    experts = ex.converted_experts(model)
    if not names and not experts:
        raise ValueError(
            "export_nvfp4: the model has no NVFP4Linear layer, so nothing trained in NVFP4; train it with hf_nvfp4 "
            "first (convert_model, from_config, or from_pretrained with quantization_config=NVFP4Config())"
        )
    modules = dict(model.named_modules())
    formats = sorted({_recipe(modules[n]).format for n in names} | {m.nvfp4_experts.state.recipe.format
                                                                      for m in experts.values()})
    if formats != ["nvfp4"]:
        raise ValueError(f"export_nvfp4: the model trained in {formats}, not NVFP4; there is no NVFP4 to export")
    odd = {n: why for n, m in experts.items() if (why := ex.unsupported_layout(m))}
    if odd:
        raise ValueError(
            "export_nvfp4: vLLM's NVFP4 MoE loaders cannot take these experts as trained: "
            + "; ".join(f"{n}: {why}" for n, why in list(odd.items())[:3])
            + ". Keep the BF16 checkpoint for this model (or train its experts in BF16 with "
            "modules_to_not_convert=['*.experts'] to export the rest)"
        )
    return names, experts


def _ensure_fused_groups(model: nn.Module) -> None:
    """fused_global_scale: a model that never ran a forward finds its groups now (a fake-tensor trace)."""
    if "_nvfp4_find_groups" in model.__dict__:
        device = next(model.parameters()).device
        find_fused_groups(model, input_ids=torch.zeros(1, 16, dtype=torch.long, device=device))


def fused_groups(linear_names: list[str]) -> list[list[str]]:
    """Sibling Linears (same parent) that serving engines fuse into one GEMM, per FUSED_SIBLINGS."""
    present = set(linear_names)
    groups = []
    for parent in dict.fromkeys(n.rpartition(".")[0] for n in linear_names):
        for sib in FUSED_SIBLINGS:
            found = [m for m in (f"{parent}.{x}".lstrip(".") for x in sib) if m in present]
            if len(found) > 1:
                groups.append(found)
    return groups


def _classify(model, names, experts, report) -> list[list[str]]:
    """Fill report.high_precision (with reasons); return the fused groups of quantized layers."""
    from ..nn.experts import expert_params

    modules = dict(model.named_modules())
    recipe = _recipe(modules[names[0]]) if names else next(iter(experts.values())).nvfp4_experts.state.recipe
    plan = plan_conversion(model, recipe)
    quantized = set(names)
    for n, m in modules.items():
        if isinstance(m, nn.Linear) and n not in quantized:
            why = plan.get(n, "convert")
            report.high_precision[n] = "not converted" if why == "convert" else why
        elif isinstance(m, nn.Embedding):
            report.high_precision[n] = "embedding"
        elif expert_params(m) and n not in experts:
            why = plan.get(n, "convert")
            report.high_precision[n] = "not converted" if why == "convert" else why
        elif n and n not in experts and _own_matrix(m):  # e.g. a router module with its own 2-D weight
            report.high_precision[n] = plan.get(n, "router" if n.rpartition(".")[2] in ("gate", "router") else
                                                "not a Linear")
    groups = fused_groups([n for n, m in modules.items() if isinstance(m, nn.Linear)])
    mixed = [g for g in groups if len({n in quantized for n in g}) > 1]
    if mixed:
        raise ValueError(
            "export_nvfp4: serving engines run these siblings as one GEMM, but only some of them trained in NVFP4: "
            + "; ".join(", ".join(f"{n} ({'NVFP4' if n in quantized else 'high precision'})" for n in g) for g in mixed)
            + ". Train them alike (modules_to_not_convert takes glob patterns)"
        )
    late = [n for n in names if (modules[n].forward_precision or modules[n].precision) != "nvfp4"]
    late += [n for n, m in experts.items() if m.nvfp4_experts.high_precision]
    if late:
        report.notes.append(
            f"{len(late)} layers run their forward in high precision now (late precision switch): their NVFP4 "
            "weights are a post-training quantization of weights that last trained in high precision"
        )
    return [g for g in groups if g[0] in quantized]


def _own_matrix(m: nn.Module) -> bool:
    w = m._parameters.get("weight")
    return not isinstance(m, (nn.Linear, nn.Embedding)) and w is not None and w.ndim == 2


def _calibrate(model, names, experts, groups, calibration, tokenizer, report) -> dict[str, torch.Tensor]:
    from .calibration import calibrate_input_amax, calibration_batches, calibration_tokens

    batches = calibration_batches(calibration, model, tokenizer)
    amax = calibrate_input_amax(model, names, batches, experts=list(experts))
    bad = [n for n, a in amax.items() if not bool(torch.isfinite(a))]
    if bad:
        raise ValueError(
            f"export_nvfp4: calibration gave a non-finite activation amax for {len(bad)} layer(s) ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): the model overflows or produces NaN on the calibration data; "
            "nothing was written"
        )
    report.calibration_tokens = calibration_tokens(batches)
    for g in groups:  # siblings share their input, and the fused GEMM takes one input scale
        amax.update(dict.fromkeys(g, torch.stack([amax[m] for m in g]).max()))
    report.calibration_batches = len(batches)
    report.input_amax = {n: float(a) for n, a in amax.items()}
    dead = [n for n, a in amax.items() if float(a) == 0]
    if dead:
        report.notes.append(f"{len(dead)} layers saw only zero inputs in calibration (input scale 1): {dead[:3]}")
    return amax


def _rel(d: torch.Tensor, ref: torch.Tensor) -> float:
    return float(d.norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))


def _training_amax(mod: NVFP4Linear) -> torch.Tensor | None:
    """The weight amax the layer's Fprop used: its fused group's (fused_global_scale), or None (its own)."""
    group = mod.__dict__.get("nvfp4_group")
    return None if group is None else group.amax()


@torch.no_grad()
def _quantize_layers(model, names, groups, report) -> dict:
    """{name: NVFP4Tensor} as exported; fills report.layers (bit-identical or how far each moved) and report.fused."""
    modules = dict(model.named_modules())
    # the training-time Fprop weight operand, as the role table defines it: 16x16 tiles, or 1x16 without 2D
    # scaling, with the fused group's amax under fused_global_scale
    tiles = {n: quantizer_for(_recipe(modules[n]), "fprop_weight", "nvfp4").tile for n in names}
    trained = {n: quantize_nvfp4(modules[n].weight, tile=tiles[n], amax=_training_amax(modules[n])) for n in names}
    out = dict(trained)
    for group in groups:  # the engine's groups: one tensor scale each
        joint = torch.stack([trained[m].amax for m in group]).max()
        for m in group:
            own, w = trained[m], modules[m].weight
            same = bool(own.amax == joint)
            q = own if same else quantize_nvfp4(w, tile=tiles[m], amax=joint)
            out[m] = q
            a, b, w = own.dequantize(), q.dequantize(), w.float()
            report.fused[m] = {
                "group": group,
                "own_amax": float(own.amax),
                "joint_amax": float(joint),
                "identical": same,
                "rel_change": _rel(b - a, a),  # exported vs training-time dequantized weights
                "changed_fraction": float((unpack_nibbles(q.data) != unpack_nibbles(own.data)).float().mean()),
                "rel_error_training": _rel(a - w, w),  # quantization error vs the master weights, for scale
                "rel_error_exported": _rel(b - w, w),
            }
    for n in names:
        same = out[n] is trained[n]
        d = 0.0 if same else float((out[n].dequantize() - trained[n].dequantize()).abs().max())
        top = float(trained[n].dequantize().abs().max())
        report.layers[n] = {"bit_identical": same, "max_abs_change": d, "max_rel_change": d / top if top else 0.0}
    return out


def _ours(f: Path) -> bool:
    """A file an export writes (and --overwrite may replace)."""
    return f.is_file() and (f.name in _WRITTEN or (f.name.startswith("model") and f.suffix == ".safetensors"))


def _check_dir(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise ValueError(f"export_nvfp4: {path} exists and is not a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return
    if not overwrite:
        raise ValueError(
            f"export_nvfp4: {path} is not empty; choose a new or empty directory "
            "(the CLI's --overwrite replaces an earlier export there)"
        )
    ours = sorted(f.name for f in path.iterdir() if _ours(f))
    if ours and not (path / REPORT_FILE).is_file():  # e.g. the training run's own directory
        raise ValueError(
            f"export_nvfp4: {path} holds {', '.join(ours[:3])} but no {REPORT_FILE}: it is not an earlier export, "
            "so --overwrite will not replace its files; choose another directory"
        )


def _prepare_dir(path: Path, overwrite: bool) -> None:
    _check_dir(path, overwrite)
    if path.is_dir() and overwrite:
        for f in path.iterdir():  # only what an export writes; anything else stays
            if _ours(f):
                f.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _write_configs(model, out: Path, fmt: str, scheme: str, dtype: torch.dtype, report: ExportReport,
                   ignore: list[str]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        producer_version = version("hf-nvfp4")
    except PackageNotFoundError:  # run from a source tree that was never installed
        producer_version = "unknown"
    qc, hf_quant = quant_config(fmt, scheme, ignore, producer_version)
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qc
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if hf_quant is not None:
        (out / "hf_quant_config.json").write_text(json.dumps(hf_quant, indent=2) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)


def _find_tokenizer(path: Path):
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "special_tokens_map.json")
    if not any((path / f).is_file() for f in files):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
