"""convert_model: swap eligible nn.Linear layers for NVFP4Linear, in place, per the recipe."""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import logging
import os
from collections.abc import Callable

import torch.nn as nn

from ..config import NVFP4Recipe, as_recipe, check_format
from ..formats.registry import PRECISIONS
from .linear import NVFP4Linear, NVFP4State, detach_states

logger = logging.getLogger("hf_nvfp4")
LM_HEAD_NAMES = ("lm_head", "embed_out", "output_layer", "score")
# Run after every conversion with (model, state): the integrations layer registers here (e.g. to
# attach the transformers quantizer), so every entry point gives the same kind of model.
ON_CONVERT: list[Callable[[nn.Module, NVFP4State], None]] = []
ON_UNCONVERT: list[Callable[[nn.Module], None]] = []
# Extra plan entries for modules that are not nn.Linear, called as (model, recipe, ids of the modules
# inside BF16 blocks) -> {name: "convert" or the reason}: MoE experts register here
# (nn/experts.py, which then converts them in an ON_CONVERT hook).
ON_PLAN: list[Callable[[nn.Module, NVFP4Recipe, set[int]], dict[str, str]]] = []


def find_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's stack of transformer (or Mamba / hybrid) blocks, found by structure.

    The nn.ModuleList with the most children that contain Linear layers; works for
    ``model.layers`` (Llama, Qwen, Mistral), ``backbone.layers`` (Nemotron-H), ``h``
    (GPT-style) alike. ("", []) when there is none.
    """
    best_name, best = "", []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList):
            kids = [c for c in mod if any(isinstance(m, nn.Linear) for m in c.modules())]
            if len(kids) > len(best):
                best_name, best = name, list(mod)
    return best_name, best


def _lm_head_names(model: nn.Module) -> set[str]:
    names = set()
    getter = getattr(model, "get_output_embeddings", None)
    head = None
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
    for name, mod in model.named_modules():
        if head is not None and mod is head:
            names.add(name)
        elif name.split(".")[-1] in LM_HEAD_NAMES and isinstance(mod, nn.Linear):
            names.add(name)
    return names


def module_matches(name: str, pattern: str) -> bool:
    """``pattern`` names this module or a parent of it: an exact (dotted) name, a parent prefix
    (``"self_attn"``, ``"layers.1"``) or a glob (``"*.q_proj"``), matched at any depth."""
    parts = name.split(".")
    for i in range(len(parts)):
        s = ".".join(parts[i:])
        if s == pattern or s.startswith(pattern + ".") or fnmatch.fnmatchcase(s, pattern):
            return True
    return False


def _check_patterns(model: nn.Module, patterns: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for p in patterns:
        if not any(module_matches(n, p) for n in names):
            short = sorted({".".join(n.split(".")[i:]) for n in names for i in range(len(n.split(".")))})
            close = difflib.get_close_matches(p, short, n=4, cutoff=0.4)
            raise ValueError(
                f"modules_to_not_convert: {p!r} matches no module of this model"
                + (f"; closest names: {close}" if close else "")
                + ". Give module names, parent-module prefixes (e.g. 'self_attn', 'layers.1') or globs."
            )


def plan_conversion(model: nn.Module, config=None) -> dict[str, str]:
    """Decide, for every nn.Linear, ``"convert"`` or the reason it stays high precision."""
    return _plan(model, as_recipe(config))


def _plan(model: nn.Module, recipe: NVFP4Recipe) -> dict[str, str]:
    _check_patterns(model, recipe.modules_to_not_convert)
    _, blocks = find_blocks(model)
    first, last = recipe.resolved_bf16_blocks(len(blocks))
    bf16_blocks = {id(b) for b in blocks[:first]} | {id(b) for b in blocks[len(blocks) - last :]}
    in_bf16_block = set()
    for b in blocks:
        if id(b) in bf16_blocks:
            in_bf16_block |= {id(m) for m in b.modules()}
    heads = _lm_head_names(model)
    plan = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if name in heads:
            plan[name] = "lm_head"
        elif any(module_matches(name, p) for p in recipe.modules_to_not_convert):
            plan[name] = "modules_to_not_convert"
        elif id(mod) in in_bf16_block:
            plan[name] = "bf16 block"
        elif mod.in_features % 16 or mod.out_features % 16:
            plan[name] = f"shape {mod.out_features}x{mod.in_features} not divisible by 16"
        else:
            plan[name] = "convert"
    for extend in ON_PLAN:  # MoE experts and Linear routers
        plan.update(extend(model, recipe, in_bf16_block))
    return plan


def _rank(rank: int | None) -> int:
    return int(os.environ.get("RANK", "0")) if rank is None else rank


def convert_model(model: nn.Module, config=None, *, rank: int | None = None) -> nn.Module:
    """Swap eligible ``nn.Linear`` layers of ``model`` for :class:`NVFP4Linear`, in place.

    ``config``: an :class:`hf_nvfp4.NVFP4Config` or :class:`NVFP4Recipe` (default: the paper's).
    Embeddings and the LM head never convert; whole blocks at the ends stay BF16 as the recipe
    says; layers with a dimension not divisible by 16 stay high precision (named in one log line).
    Parameters are untouched, so the state_dict is exactly the original's. The recipe is frozen
    here: change it with :func:`set_recipe`. A model converted before is re-planned whole with the
    new recipe (never a mix of two). ``rank`` (default: $RANK) gives each process its own SR stream.

    >>> import torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)),
    ...                            hf_nvfp4.NVFP4Config(bf16_last_blocks=0))
    >>> type(m[0]).__name__
    'NVFP4Linear'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model: model must be a torch.nn.Module, got {type(model).__name__}")
    recipe = as_recipe(config)
    check_format(recipe, recipe.format, "convert_model")
    # Validate everything first, on the model as it is (a converted model plans alike: NVFP4Linear is
    # an nn.Linear, experts keep their parameters), so a refused recipe leaves a converted model as it was.
    plan = _plan(model, recipe)
    n_convert = sum(d == "convert" for d in plan.values())
    if n_convert == 0:
        reasons = sorted({d for d in plan.values()})
        raise ValueError(
            f"convert_model: no Linear layer or MoE expert module of {type(model).__name__} can be converted "
            f"({len(plan)} candidates; reasons: {reasons or ['the model has no nn.Linear and no expert module']}). "
            "Lower bf16_first_blocks/bf16_last_blocks or narrow modules_to_not_convert."
        )
    from .te_backend import select_backend

    backend, why = select_backend(recipe, model)  # raises for backend="te" where TE cannot run
    if is_converted(model):
        unconvert_model(model)  # re-plan the whole model: one recipe for every layer
    state = NVFP4State(recipe, rank=_rank(rank))
    modules = dict(model.named_modules())
    converted = []
    for name, decision in plan.items():
        if decision == "convert" and isinstance(modules[name], nn.Linear):  # ON_PLAN entries: their hooks
            mod = modules[name]
            mod.__class__ = NVFP4Linear
            mod._init_nvfp4(state)
            converted.append(mod)
    if backend == "te":
        from .te_backend import attach_te

        for mod in converted:
            attach_te(mod)
    for mod in converted:
        mod.backend = backend
    state.attach(model)
    model.nvfp4_state = state
    for hook in ON_CONVERT:
        hook(model, state)
    if state.rank == 0:
        odd = [n for n, d in plan.items() if d.startswith("shape")]
        if odd:
            logger.warning("hf_nvfp4: %d layer(s) stay high precision, a dimension not divisible by 16: %s",
                           len(odd), ", ".join(odd))
        n_linear = sum(isinstance(modules[n], nn.Linear) for n in plan)
        logger.info("hf_nvfp4: converted %d of %d Linear layers (%s backend: %s)", len(converted), n_linear,
                    backend, why)
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` holds NVFP4 layers (NVFP4Linear or converted MoE experts)."""
    return getattr(model, "nvfp4_state", None) is not None or any(isinstance(m, NVFP4Linear) for m in model.modules())


def require_converted(model: nn.Module, what: str) -> None:
    """Raise where ``what`` (a precision request) would silently do nothing: ``model`` has no NVFP4 layers."""
    if not is_converted(model):
        raise ValueError(
            f"{what}: {type(model).__name__} has no NVFP4 layers (it was never converted, or was unconverted), "
            "so it computes in high precision already and a precision request would do nothing. Convert it "
            "first: hf_nvfp4.convert_model(model, hf_nvfp4.NVFP4Config()), from_pretrained(..., "
            "quantization_config=NVFP4Config()) or hf_nvfp4.from_config"
        )


def unconvert_model(model: nn.Module) -> nn.Module:
    """Turn every NVFP4Linear back into a plain nn.Linear (same parameters), in place."""
    from .te_backend import detach_te

    for mod in model.modules():
        if isinstance(mod, NVFP4Linear):
            detach_states(mod)
            detach_te(mod)  # every _te_* attribute
            for attr in ("nvfp4_state", "backend"):
                mod.__dict__.pop(attr, None)
            mod.__class__ = nn.Linear
    model.__dict__.pop("nvfp4_state", None)
    detach_states(model)
    for hook in ON_UNCONVERT:
        hook(model)
    return model


def set_recipe(model: nn.Module, recipe=None, **changes) -> nn.Module:
    """Change a converted model's recipe: validated, applied to every layer (and to TE) alike.

    ``recipe``: a whole new NVFP4Config/NVFP4Recipe, or None to start from the current one;
    ``changes``: fields to replace. The model is re-planned (layer selection may change); the
    precision switch is kept where the new recipe allows it (else reset, with a warning).
    Atomic: the new recipe and the model's new plan are validated before anything changes, so a
    refused recipe (an unknown field, ``bf16_first_blocks`` covering every block, a
    ``modules_to_not_convert`` pattern matching nothing, ...) raises and leaves the model exactly
    as it was: its layers, recipe, switch state and SR stream.

    >>> import torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(32, 32)), hf_nvfp4.NVFP4Config(bf16_last_blocks=0))
    >>> hf_nvfp4.set_recipe(m, disable_rht=True).nvfp4_state.recipe.disable_rht
    True
    """
    state = getattr(model, "nvfp4_state", None)
    if state is None:
        raise ValueError("set_recipe: this model is not converted; call hf_nvfp4.convert_model(model, config) first")
    new = (as_recipe(recipe) if recipe is not None else state.recipe).replace(**changes)
    switch = (state.precision, state.forward_precision)
    convert_model(model, new, rank=state.rank)
    model.nvfp4_state.draw_generator = state.draw_generator  # the SR draw source stays the caller's
    if switch != (state.recipe.format, None):
        try:
            model.nvfp4_state.set_precision(*switch)
        except ValueError:
            logger.warning("hf_nvfp4: set_recipe: the precision switch %s does not fit the new recipe; reset", switch)
    return model


SCOPES = ("all", "forward", "backward")  # what a precision switch changes: all GEMMs, Fprop, Dgrad+Wgrad


def _states(model: nn.Module) -> list[NVFP4State]:
    states = {id(m.nvfp4_state): m.nvfp4_state for m in model.modules() if isinstance(m, NVFP4Linear)}
    if getattr(model, "nvfp4_state", None) is not None:  # also switches layers that are not Linear (experts)
        states[id(model.nvfp4_state)] = model.nvfp4_state
    return list(states.values())


@contextlib.contextmanager
def temporary_precision(model: nn.Module, precision: str | None, scope: str = "all"):
    """Compute in ``precision`` (any format name, or None: unchanged) inside the block, as
    :func:`set_precision` with ``scope``; every layer's switch is restored afterwards, even on error.

    >>> import torch, torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(32, 32)), hf_nvfp4.NVFP4Config(bf16_last_blocks=0))
    >>> with temporary_precision(m, "bf16"):
    ...     m[0].precision
    'bf16'
    >>> m[0].precision
    'nvfp4'
    """
    saved = [(st, st.precision, st.forward_precision) for st in _states(model)]
    try:
        if precision is not None:
            set_precision(model, precision, scope)
        yield model
    finally:
        for st, p, fp in saved:
            st.set_precision(p, fp)


def set_precision(model: nn.Module, precision: str, scope: str = "all") -> int:
    """Set the precision of every NVFP4Linear in ``model``; returns how many layers it applies to.

    scope="all": all three GEMMs (the paper's late switch); scope="forward": Fprop only
    (the cheap variant that recovers most of the gap); scope="backward": Dgrad and Wgrad only
    (the paper's control, which recovers nothing). A model without NVFP4 layers raises
    ``ValueError`` (nothing to switch: it is not converted).

    >>> import torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(32, 32)), hf_nvfp4.NVFP4Config(bf16_last_blocks=0))
    >>> hf_nvfp4.set_precision(m, "bf16", scope="forward")
    1
    """
    if precision not in PRECISIONS:
        raise ValueError(f"set_precision: precision must be one of {PRECISIONS}, got {precision!r}")
    if scope not in SCOPES:
        raise ValueError(f"set_precision: scope must be one of {SCOPES}, got {scope!r}")
    if not _states(model):
        require_converted(model, f"set_precision(model, {precision!r})")
    n = 0
    for st in _states(model):
        if scope == "all":
            n += st.set_precision(precision, None)
        elif scope == "forward":
            n += st.set_precision(st.precision, None if precision == st.precision else precision)
        else:  # Fprop keeps what it computed in; the backward GEMMs switch
            fwd = st.forward_precision or st.precision
            n += st.set_precision(precision, None if fwd == precision else fwd)
    return n


__all__ = ["NVFP4Recipe", "SCOPES", "convert_model", "find_blocks", "is_converted", "plan_conversion",
           "require_converted", "set_precision", "set_recipe", "temporary_precision", "unconvert_model",
           "module_matches"]
