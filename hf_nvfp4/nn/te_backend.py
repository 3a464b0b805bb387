"""Transformer Engine backend: an NVFP4Linear's GEMMs through a ``te.Linear``, decided per call.

Checked against TE's source (NVIDIA/TransformerEngine at d0067d0da, 2.20.0.dev0); it has never
run on a Blackwell GPU. Its contract is tested against a TE stand-in (tests/te_standin) that
models TE's preconditions and numerics from that source, with citations; it is not TE. What TE
can run per format lives in the format registry (``formats/registry.py``, ``TE_SUPPORT``).

- TE is never imported at package import; ``te_status`` says whether it can run here and why not.
- Binding: the ``te.Linear`` is built lazily on the first CUDA forward, with ``device="meta"``
  (TE's default device is "cuda": it would allocate and initialise a weight on the current
  GPU, consuming CUDA RNG), and before every call its ``weight`` entry is pointed at the
  NVFP4Linear's *current* Parameter. from_pretrained (transformers 5 replaces Parameter
  objects while loading), FSDP2, ``load_state_dict(assign=True)`` and ``to_empty()`` swap them.
  The bias is added here in the compute dtype, as the emulation does (TE rounds an fp32 bias
  to bf16 for quantized GEMMs, module/linear.py). The state_dict stays weight (+ bias).
- Under autocast the input is cast to the compute dtype before the TE call (TE's quantized path
  does not cast it, module/linear.py:426-437); the emulation quantizes the same cast tensor.
- Calls TE cannot take are made to fit where that is exact, or go to the emulated path for
  that call, said once per reason: token counts are zero padded to TE's alignment (NVFP4: 128)
  and sliced back; an input whose dtype differs from the parameters' outside autocast runs
  under ``torch.autocast(dtype=x.dtype)``; an RHT recipe with a non-bf16 compute dtype, any
  NVFP4 call computing in fp16 (an FP4 GEMM cannot write fp16), a CPU input, or a precision TE
  has no recipe for runs emulated.
- Stochastic rounding: TE draws it from the default CUDA generator, so ``NVFP4Config.seed``
  does not apply; ``torch.cuda.manual_seed`` and the CUDA RNG state (the Trainer's RNG
  checkpoint) do.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os

import torch

from ..config import PAPER_RHT_GEMMS, PAPER_STOCHASTIC_ROLES
from ..formats.registry import te_support
from .te_recipes import build_te_recipe, compute_dtype_reason, layer_unsupported, te_recipe_kwargs, token_multiple

__all__ = ["attach_te", "detach_te", "select_backend", "te_forward", "te_recipe_kwargs", "te_status"]

logger = logging.getLogger("hf_nvfp4")
MIN_TE = (2, 8)
SR_FIX_TE = (2, 19)  # TE PR #3281 (merged 2026-08-12, after v2.18): SR on GPUs without cvt.rs
_TE_DEVICE_TYPE = "cuda"  # the device TE computes on; tests with the TE stand-in set "cpu"
SR_CAVEAT = (
    "hf_nvfp4: under Transformer Engine, stochastic rounding draws from the default CUDA generator: "
    "NVFP4Config.seed does not apply; torch.cuda.manual_seed / transformers.set_seed and the CUDA RNG "
    "state (which the Trainer checkpoints) do"
)
_SAID: set[str] = set()
_STATUS: dict[tuple, tuple[bool, str]] = {}


def say_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _SAID:
        _SAID.add(key)
        logger.log(level, msg, *args)


def reset() -> None:
    """Forget cached TE checks and once-only messages (for tests)."""
    _SAID.clear()
    _STATUS.clear()


def te_unsupported_reason(recipe) -> str | None:
    """Why TE cannot run ``recipe`` (our frozen recipe, or anything with its field names) at all, or None."""
    if te_support(recipe.format) is None:
        return f"format={recipe.format!r} runs on the emulated backend (Transformer Engine has no recipe for it)"
    if getattr(recipe, "fused_global_scale", False):
        return "fused_global_scale=True (sibling layers sharing one weight tensor scale) needs the emulated backend"
    if recipe.format == "nvfp4" and recipe.rht_size != 16 and not recipe.disable_rht:
        return f"TE's RHT is 16-point; rht_size={recipe.rht_size} needs the emulated backend"
    rht = tuple(getattr(recipe, "rht_gemms", PAPER_RHT_GEMMS))
    sr = sorted(getattr(recipe, "stochastic_roles", PAPER_STOCHASTIC_ROLES))
    moved = (not recipe.disable_rht and rht != PAPER_RHT_GEMMS) or (
        not recipe.disable_stochastic_rounding and sr != sorted(PAPER_STOCHASTIC_ROLES))
    if moved:  # the negative controls: TE has no such placement
        return "RHT/stochastic rounding moved off the paper's operands (a negative control) needs the emulated backend"
    return None


def parse_version(v: str) -> tuple[int, int]:
    parts = (v.split("+")[0].split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def has_sr_fix(version: str) -> bool:
    """TE with PR #3281: >= 2.20, or a 2.19 release (2.19 dev builds from before 2026-08-12 lack it)."""
    v = parse_version(version)
    return v > SR_FIX_TE or (v == SR_FIX_TE and "dev" not in version)


def nvfp4_capability_reason(capability: tuple[int, int], version: str, stochastic: bool = True) -> str | None:
    """Why NVFP4 training through TE ``version`` is not known to work on this GPU, or None."""
    major, minor = capability
    if major == 10:
        return None
    if major in (11, 12):
        if not stochastic or has_sr_fix(version):
            return None
        return (
            f"compute capability {major}.{minor} has no cvt.rs instruction, and Transformer Engine {version} "
            "returns all-zero NVFP4 data for stochastically rounded tensors there (silent training on zero "
            "gradients; fixed by TE PR #3281, after 2.18). Install transformer-engine >= 2.19, or set "
            "disable_stochastic_rounding=True"
        )
    return f"NVFP4 training through TE needs compute capability 10.x (12.x: TE >= 2.19), this GPU is {major}.{minor}"


def _te_check(precision: str) -> tuple[bool, str]:
    check = te_support(precision).check  # TE's support check (quantization.py; fp8.py on TE 2.8)
    for mod_name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            fn = getattr(importlib.import_module(mod_name), check, None)
        except Exception:  # noqa: BLE001 - ImportError, or a broken CUDA install
            continue
        if fn is not None:
            ok, reason = fn()
            return bool(ok), str(reason or "")
    return False, f"this Transformer Engine has no {check}"


def te_status(precision: str = "nvfp4", stochastic: bool = True) -> tuple[bool, str]:
    """(usable, reason): TE >= 2.8 importable and able to run ``precision`` on this GPU."""
    key = (precision, stochastic)
    if key in _STATUS:
        return _STATUS[key]
    try:
        te = importlib.import_module("transformer_engine")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken CUDA install
        return False, f"transformer_engine is not importable ({type(exc).__name__})"
    version = str(getattr(te, "__version__", "0.0"))
    if parse_version(version) < MIN_TE:
        return False, f"transformer_engine {version} is older than 2.8 (no NVFP4BlockScaling)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if te_support(precision) is None:
        return False, f"Transformer Engine has no recipe for {precision!r}"
    cap = tuple(torch.cuda.get_device_capability())
    ok, reason = _te_check(precision)
    if ok and precision == "nvfp4":
        why = nvfp4_capability_reason(cap, version, stochastic)
        ok, reason = why is None, why or ""
    if not ok:
        res = (False, reason or f"Transformer Engine reports no {precision} support on this GPU")
    else:
        res = (
            True,
            f"transformer_engine {version} on {torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})",
        )
    _STATUS[key] = res
    return res


def select_backend(recipe, model=None) -> tuple[str, str]:
    """("te" | "emulated", why) for ``recipe.backend``; "te" raises if TE cannot run."""
    if recipe.backend == "emulated":
        return "emulated", "asked for"
    unsupported = te_unsupported_reason(recipe)
    stochastic = not recipe.disable_stochastic_rounding
    usable, reason = (False, unsupported) if unsupported else te_status(recipe.format, stochastic)
    if recipe.backend == "te" and not usable:
        raise RuntimeError(
            f"NVFP4Config(backend='te') but Transformer Engine cannot run here: {reason}. "
            "Use backend='auto' or 'emulated' to train with the bit-faithful emulation."
        )
    if usable and recipe.format == "nvfp4" and stochastic:
        say_once("sr-caveat", logging.WARNING, SR_CAVEAT)
    if usable and os.environ.get("NVTE_USE_FAST_MATH", "0") not in ("", "0"):
        # read by TE's C++ quantizer on every cast (csrc/quantizer.cpp), so no recipe field can pin it
        say_once(
            "fast-math",
            logging.WARNING,
            "hf_nvfp4: NVTE_USE_FAST_MATH is set: TE's NVFP4 casts then use an approximate reciprocal and skip "
            "the bf16 rounding of RHT outputs, so they are no longer bit-identical to the recipe's",
        )
    if usable and model is not None and next(model.parameters(), torch.empty(0)).device.type != _TE_DEVICE_TYPE:
        logger.info("hf_nvfp4: TE is usable; each layer's te.Linear is built on its first CUDA forward")
    return ("te", reason) if usable else ("emulated", reason)


def _te():
    te = importlib.import_module("transformer_engine.pytorch")
    recipe = importlib.import_module("transformer_engine.common.recipe")
    return te, recipe


def attach_te(layer) -> None:
    """Mark ``layer`` for TE; its te.Linear is built on the first CUDA forward (nothing allocated now)."""
    object.__setattr__(layer, "_te_module", None)  # outside the module tree: state_dict unchanged
    object.__setattr__(layer, "_te_recipes", {})


def detach_te(layer) -> None:
    """Remove every TE attribute from ``layer`` (unconvert_model)."""
    for name in [n for n in layer.__dict__ if n.startswith("_te_")]:
        del layer.__dict__[name]


def _recipe_of(layer):
    """The layer's frozen numerics recipe (not a TE recipe)."""
    state = layer.nvfp4_state
    return state.recipe


def _bound_module(layer, te):
    mod = layer.__dict__.get("_te_module")
    if mod is None:
        mod = te.Linear(
            layer.in_features, layer.out_features, bias=False, params_dtype=layer.weight.dtype, device="meta"
        )
        object.__setattr__(layer, "_te_module", mod)
    if mod._parameters.get("weight") is not layer.weight:
        mod._parameters["weight"] = layer.weight  # share, never copy: optimizers and checkpoints see one tensor
    if mod.training != layer.training:
        mod.train(layer.training)
    return mod


def _te_recipe(layer, te_recipe_mod, recipe, precision, fwd, compute_dtype):
    """(TE recipe, None) or (None, why), cached per (precision, forward precision, compute dtype)."""
    cache = layer.__dict__.setdefault("_te_recipes", {})
    key = (precision, fwd, compute_dtype)
    if key not in cache:
        why = layer_unsupported(precision, layer.in_features, layer.out_features)
        cache[key] = (None, why) if why else build_te_recipe(te_recipe_mod, recipe, precision, fwd, compute_dtype)
    return cache[key]


class _AddBias(torch.autograd.Function):
    """``y + bias`` in y's dtype, the bias gradient summed in fp32: as the emulated path does."""

    @staticmethod
    def forward(ctx, y, bias):
        ctx.bias_dtype = bias.dtype
        return y + bias.to(y.dtype)

    @staticmethod
    def backward(ctx, dy):
        return dy, dy.reshape(-1, dy.shape[-1]).float().sum(0).to(ctx.bias_dtype)


def _autocast(te, recipe):
    if getattr(te, "autocast", None) is not None:  # TE >= 2.9
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def te_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` through TE, or None when this call must run on the emulated path.

    Under autocast, ``x`` is cast to the compute dtype here, as ``nn.Linear`` would: TE's
    quantized path quantizes its input without casting it (module/linear.py:426-437 at
    d0067d0da; the AMP cast is only in the unquantized branch, :439), so an fp32 activation
    (Llama's RMSNorm output under bf16 autocast) would reach the NVFP4 quantizer as fp32. The
    emulated path quantizes the same cast tensor (ops/linear.py).
    """
    precision, fwd = layer.precision, layer.forward_precision
    fwd = None if fwd == precision else fwd
    if precision == "bf16" and fwd is None:
        return None  # plain torch GEMMs; TE adds nothing
    dev = _TE_DEVICE_TYPE
    if x.device.type != dev:
        say_once(
            f"device-{x.device.type}",
            logging.INFO,
            "hf_nvfp4: input on %s, not CUDA: emulated path until it moves",
            x.device,
        )
        return None
    recipe = _recipe_of(layer)
    ok, reason = te_status(precision, not recipe.disable_stochastic_rounding)
    in_autocast = torch.is_autocast_enabled(dev)
    cdtype = torch.get_autocast_dtype(dev) if in_autocast else x.dtype
    te_recipe = None
    if ok:
        reason = compute_dtype_reason(recipe, precision, cdtype)
        if reason is not None:
            say_once(f"dtype-{precision}-{cdtype}", logging.WARNING, "hf_nvfp4: %s", reason)
            return None
        te_recipe, reason = _te_recipe(layer, _te()[1], recipe, precision, fwd, cdtype)
    if te_recipe is None:
        say_once(
            f"recipe-{precision}-{fwd}-{reason}",
            logging.WARNING,
            "hf_nvfp4: precision=%s%s runs on the emulated path: %s",
            precision,
            f" (forward {fwd})" if fwd else "",
            reason,
        )
        return None
    cast = contextlib.nullcontext()
    if in_autocast:
        x = x.to(cdtype)  # what TE's quantizers receive; differentiable, so dx returns in x's dtype
    elif layer.weight.dtype != x.dtype:
        if x.dtype not in (torch.bfloat16, torch.float16):
            say_once(
                f"dtype-{x.dtype}-{layer.weight.dtype}",
                logging.WARNING,
                "hf_nvfp4: input %s with %s parameters outside autocast: TE needs them equal "
                "(module/base.py), so those calls run on the emulated path",
                x.dtype,
                layer.weight.dtype,
            )
            return None
        cast = torch.autocast(dev, dtype=x.dtype)  # the emulation's compute dtype too; exact
    te, _ = _te()
    mod = _bound_module(layer, te)
    lead, k = x.shape[:-1], x.shape[-1]
    m = math.prod(lead)
    x2 = x.reshape(m, k)
    multiple = token_multiple(precision)
    pad = (-m) % multiple
    if pad:
        say_once(
            f"pad-{precision}",
            logging.INFO,
            "hf_nvfp4: TE's %s operations take token counts divisible by %d (the token dim is the K of the "
            "Wgrad GEMM); other counts (generate(), odd batches) are zero padded in the adapter and sliced back",
            precision,
            multiple,
        )
        x2 = torch.cat([x2, x2.new_zeros(pad, k)])
    with cast, _autocast(te, te_recipe):
        y = mod(x2)
    if pad:
        y = y[:m]
    if layer.bias is not None:
        y = _AddBias.apply(y, layer.bias)
    return y.reshape(*lead, layer.out_features)
