"""How much of a model's matmul work runs in the low-precision format: :func:`coverage`.

Counted: the weights of nn.Linear layers and of experts modules (3-D expert Parameters),
and their per-token matmul FLOPs (2 x weights for a Linear; 2 x top_k x one expert's
weights for routed experts, as each token visits top_k experts). Not counted (the paper
keeps them in high precision and they are not block GEMMs of the recipe): embeddings, the
LM head, routers, attention score/value products, norms, biases.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import torch.nn as nn

from .convert import ON_CONVERT, plan_conversion
from .experts import EXPERTS_IMPLEMENTATION, expert_matrices, expert_params, find_experts, uses_experts_interface
from .linear import NVFP4Linear

logger = logging.getLogger("hf_nvfp4")
EXCLUDED = ("lm_head", "router")
TOP_K_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")


@dataclass
class CoverageEntry:
    name: str
    kind: str  # "linear" | "experts" | "other"
    weights: int
    flops_per_token: int
    precision: str  # the format it runs in, "bf16" when high precision
    reason: str  # "converted", or why it stays high precision
    via: str = ""  # converted experts: "experts interface" (transformers') or "adapter (ClassName)" (ours)


@dataclass
class Coverage:
    """Shares of matmul weights and per-token matmul FLOPs in the low-precision format.

    >>> import torch.nn as nn, hf_nvfp4
    >>> m = hf_nvfp4.convert_model(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40)))
    >>> c = hf_nvfp4.coverage(m)
    >>> round(c.weight_share, 3), c.high_precision()
    (0.615, {'shape not a multiple of 16': ['1']})
    """

    format: str
    entries: list[CoverageEntry] = field(default_factory=list)
    # converted experts modules of a model whose Linears run on Transformer Engine: the experts
    # run emulated (TE's GroupedLinear is not wired; docs/moe.md)
    emulated_on_te: list[str] = field(default_factory=list)

    def _sum(self, attr: str, converted: bool | None = None) -> int:
        return sum(getattr(e, attr) for e in self.entries if converted is None or (e.precision != "bf16") == converted)

    @property
    def weights_total(self) -> int:
        return self._sum("weights")

    @property
    def weights_converted(self) -> int:
        return self._sum("weights", True)

    @property
    def flops_total(self) -> int:
        return self._sum("flops_per_token")

    @property
    def flops_converted(self) -> int:
        return self._sum("flops_per_token", True)

    @property
    def weight_share(self) -> float:
        return self.weights_converted / self.weights_total if self.weights_total else 0.0

    @property
    def flop_share(self) -> float:
        return self.flops_converted / self.flops_total if self.flops_total else 0.0

    def high_precision(self) -> dict[str, list[str]]:
        """Reason category -> module names left in high precision."""
        out: dict[str, list[str]] = {}
        for e in self.entries:
            if e.precision == "bf16":
                out.setdefault(_category(e.reason), []).append(e.name)
        return out

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "weight_share": self.weight_share,
            "flop_share": self.flop_share,
            "weights_total": self.weights_total,
            "weights_converted": self.weights_converted,
            "flops_per_token_total": self.flops_total,
            "flops_per_token_converted": self.flops_converted,
            "high_precision": self.high_precision(),
            "entries": [asdict(e) for e in self.entries],
            "emulated_on_te": list(self.emulated_on_te),
        }

    def summary(self) -> str:
        fmt = self.format.upper() if self.format == "nvfp4" else self.format
        head = (
            f"hf_nvfp4 coverage: {100 * self.weight_share:.1f}% of matmul weights "
            f"({self.weights_converted:,} of {self.weights_total:,}) and {100 * self.flop_share:.1f}% of "
            f"per-token matmul FLOPs (top-k experts counted) in {fmt}; embeddings, LM head and routers excluded"
        )
        kept = []
        for cat, names in self.high_precision().items():
            w = sum(e.weights for e in self.entries if e.name in set(names))
            shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
            kept.append(f"{cat}: {len(names)} module(s), {w:,} weights [{shown}]")
        adapted = sorted({e.via for e in self.entries if e.via.startswith("adapter")})
        via = f" Experts through hf_nvfp4's own {', '.join(adapted)}." if adapted else ""
        te = (f" Experts run emulated on the TE backend ({len(self.emulated_on_te)} module(s)): TE's "
              "GroupedLinear is not wired." if self.emulated_on_te else "")
        tail = ". High precision: " + "; ".join(kept) + "." if kept else ". Nothing left in high precision."
        return head + tail + via + te


def _category(reason: str) -> str:
    if reason.startswith("shape"):
        return "shape not a multiple of 16"
    if reason == "bf16 block":
        return "kept block (bf16)"
    if reason == "modules_to_not_convert":
        return "pattern (modules_to_not_convert)"
    return reason


def _top_k(model_modules: dict[str, nn.Module], name: str, mod: nn.Module) -> int:
    parent = model_modules.get(name.rsplit(".", 1)[0] if "." in name else "")
    for sib in parent.children() if parent is not None else ():
        k = getattr(sib, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    cfg = getattr(mod, "config", None)
    for key in TOP_K_KEYS:
        k = getattr(cfg, key, None)
        if isinstance(k, int) and k > 0:
            return k
    return 1


def coverage(model: nn.Module) -> Coverage:
    """What runs in the low-precision format, as data; ``.summary()`` is the logged line.

    Reasons for high precision: ``bf16 block`` (the recipe's kept first/last blocks),
    ``modules_to_not_convert``, a dimension not a multiple of 16, an unsupported module
    type (e.g. 3-D expert weights outside transformers' experts interface), a late switch
    to bf16, or the model not being converted at all.
    """
    state = getattr(model, "nvfp4_state", None)
    plan = plan_conversion(model, state.recipe) if state is not None else {}
    fmt = state.recipe.format if state is not None else "nvfp4"
    modules = dict(model.named_modules())
    experts = find_experts(model)
    out = Coverage(format=fmt)
    on_te = any(getattr(m, "backend", None) == "te" for m in modules.values() if isinstance(m, NVFP4Linear))
    for name, mod in modules.items():
        decision = plan.get(name, "model not converted" if state is None else "not converted")
        if decision in EXCLUDED:
            continue
        if isinstance(mod, nn.Linear):
            w = mod.in_features * mod.out_features
            conv = isinstance(mod, NVFP4Linear)
            prec = mod.precision if conv else "bf16"
            out.entries.append(CoverageEntry(name, "linear", w, 2 * w, prec, _reason(prec, conv, decision)))
        elif name in experts:
            rec = getattr(mod, "nvfp4_experts", None)
            conv = rec is not None and rec.converted
            prec = rec.precision if conv else "bf16"
            impl = getattr(getattr(mod, "config", None), "_experts_implementation", EXPERTS_IMPLEMENTATION)
            if conv and impl != EXPERTS_IMPLEMENTATION:  # e.g. model.set_experts_implementation() after conversion
                prec, decision = "bf16", f"experts implementation switched to {impl!r}"
            n_experts = next(iter(expert_params(mod).values())).shape[0]
            if uses_experts_interface(mod) and "unsupported" not in decision:
                (n1, k1), (n2, k2) = expert_matrices(mod)
                per_expert = n1 * k1 + n2 * k2
            else:  # every 3-D Parameter counts as expert matmul weights
                per_expert = sum(p[0].numel() for p in expert_params(mod).values())
            flops = 2 * _top_k(modules, name, mod) * per_expert
            if on_te and prec != "bf16":
                out.emulated_on_te.append(name)
            via = ("experts interface" if rec.adapter is None else f"adapter ({rec.adapter})") if conv else ""
            out.entries.append(
                CoverageEntry(name, "experts", per_expert * n_experts, flops, prec, _reason(prec, conv, decision), via)
            )
        elif type(mod).__name__ == "Conv1D" and getattr(getattr(mod, "weight", None), "ndim", 0) == 2:
            w = mod.weight.numel()  # GPT-2 style Linear stored transposed
            reason = f"unsupported module type ({type(mod).__name__})"
            out.entries.append(CoverageEntry(name, "other", w, 2 * w, "bf16", reason))
    return out


def _reason(precision: str, converted: bool, decision: str) -> str:
    if precision != "bf16":
        return "converted"
    if decision.startswith("experts implementation switched"):
        return decision
    if converted:
        return "precision set to bf16 (set_precision)"
    return "not converted" if decision == "convert" else decision


def log_coverage(model: nn.Module, state=None) -> Coverage | None:
    """Log the coverage line once (on rank 0); loudly (WARNING) when most matmul weights stay high
    precision. Runs in ``ON_CONVERT``, after the experts are converted: every conversion reports."""
    if state is not None and state.rank != 0:
        return None
    cov = coverage(model)
    if cov.weights_total and cov.weight_share < 0.5:
        logger.warning(
            "hf_nvfp4: MOST MATMUL WEIGHTS STAY IN HIGH PRECISION. %s. See hf_nvfp4.coverage(model).", cov.summary()
        )
    else:
        logger.info("%s", cov.summary())
    return cov


if log_coverage not in ON_CONVERT:
    ON_CONVERT.append(log_coverage)
