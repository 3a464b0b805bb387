"""Transformer Engine backend: te.Linear under an NVFP4BlockScaling autocast (Blackwell only).

TE is never imported at package import. The pure parts (flag mapping, version and
hardware checks) are plain functions with tests; the rest runs only where TE imports and
the GPU can train NVFP4 (compute capability 10.x). There the NVFP4Linear keeps its own
weight and bias Parameters and hands them to a te.Linear it holds outside the module tree,
so the state_dict stays exactly weight (+ bias).
"""

from __future__ import annotations

import importlib
import logging

import torch

from ..ops.recipe import PAPER_RHT_GEMMS, PAPER_STOCHASTIC_ROLES

logger = logging.getLogger("hf_nvfp4")
MIN_TE = (2, 8)


def te_recipe_kwargs(config) -> dict:
    """Our config -> ``NVFP4BlockScaling(**kwargs)``: the flags have TE's names and meanings."""
    return {
        "disable_rht": config.disable_rht,
        "disable_stochastic_rounding": config.disable_stochastic_rounding,
        "disable_2d_quantization": config.disable_2d_quantization,
    }


def te_unsupported_reason(config) -> str | None:
    """Why TE cannot run this config exactly, or None."""
    if config.format != "nvfp4":
        return f"format={config.format!r} runs on the emulated backend (TE is used for nvfp4 only)"
    if config.rht_size != 16:
        return f"TE's RHT is 16-point; rht_size={config.rht_size} needs the emulated backend"
    rht = tuple(getattr(config, "rht_gemms", PAPER_RHT_GEMMS))
    sr = sorted(getattr(config, "stochastic_roles", PAPER_STOCHASTIC_ROLES))
    if rht != PAPER_RHT_GEMMS or sr != sorted(PAPER_STOCHASTIC_ROLES):
        return "RHT/stochastic rounding moved off the paper's operands (a negative control) needs the emulated backend"
    return None


def parse_version(v: str) -> tuple[int, int]:
    parts = (v.split("+")[0].split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def te_status() -> tuple[bool, str]:
    """(usable, reason): TE >= 2.8 importable and the GPU can train NVFP4."""
    try:
        te = importlib.import_module("transformer_engine")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        return False, f"transformer_engine is not importable ({type(exc).__name__})"
    version = getattr(te, "__version__", "0.0")
    if parse_version(version) < MIN_TE:
        return False, f"transformer_engine {version} is older than 2.8 (no NVFP4BlockScaling)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    for mod_name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001
            continue
        fn = getattr(mod, "is_nvfp4_available", None) or getattr(mod, "check_nvfp4_support", None)
        if fn is None:
            continue
        res = fn(return_reason=True) if fn.__name__ == "is_nvfp4_available" else fn()
        ok, reason = (res, "") if isinstance(res, bool) else (bool(res[0]), str(res[1]))
        if ok:
            return True, f"transformer_engine {version} on {torch.cuda.get_device_name()}"
        return False, reason or "TE reports no NVFP4 support on this GPU"
    # TE does not refuse early on other GPUs: check the compute capability ourselves.
    major, minor = torch.cuda.get_device_capability()
    if major == 10:
        return True, f"transformer_engine {version}, compute capability {major}.{minor}"
    return False, f"NVFP4 training needs compute capability 10.x, this GPU is {major}.{minor}"


def select_backend(config, model=None) -> tuple[str, str]:
    """("te" | "emulated", why) for ``config.backend``; "te" raises if TE cannot run."""
    if config.backend == "emulated":
        return "emulated", "asked for"
    unsupported = te_unsupported_reason(config)
    usable, reason = (False, unsupported) if unsupported else te_status()
    if config.backend == "te" and not usable:
        raise RuntimeError(
            f"NVFP4Config(backend='te') but Transformer Engine cannot run here: {reason}. "
            "Use backend='auto' or 'emulated' to train with the bit-faithful emulation."
        )
    if usable and model is not None and next(model.parameters(), torch.empty(0)).device.type != "cuda":
        logger.info("hf_nvfp4: TE is usable, but the model is not on a CUDA device yet; it is bound on first use")
    return ("te", reason) if usable else ("emulated", reason)


def _te():
    te = importlib.import_module("transformer_engine.pytorch")
    recipe = importlib.import_module("transformer_engine.common.recipe")
    return te, recipe


def attach_te(layer) -> None:
    """Give ``layer`` a te.Linear that computes with the layer's own Parameters."""
    te, recipe_mod = _te()
    with torch.device("meta"):
        mod = te.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, params_dtype=layer.weight.dtype
        )
    mod.weight = layer.weight  # share, never copy: optimizers and checkpoints see one tensor
    if layer.bias is not None:
        mod.bias = layer.bias
    object.__setattr__(layer, "_te_module", mod)  # outside the module tree
    object.__setattr__(layer, "_te_recipe", recipe_mod.NVFP4BlockScaling(**te_recipe_kwargs(layer.nvfp4_state.recipe)))


def te_forward(layer, x: torch.Tensor) -> torch.Tensor:
    te, _ = _te()
    autocast = getattr(te, "autocast", None)
    if autocast is not None:  # TE >= 2.9
        ctx = autocast(enabled=True, recipe=layer._te_recipe)
    else:
        ctx = te.fp8_autocast(enabled=True, fp8_recipe=layer._te_recipe)
    with ctx:
        return layer._te_module(x)
