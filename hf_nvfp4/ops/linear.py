"""The emulated NVFP4 Linear: Fprop, Dgrad and Wgrad exactly as the paper's recipe.

With y = x W^T, x: [M tokens, K], W: [N, K]:

    Fprop  y  = Q(x, 1x16, nearest) . Q(W, 16x16, nearest)^T
    Dgrad  dx = Q(dy, 1x16 along N, stochastic) . Q(W, 16x16)       (the same quantized W)
    Wgrad  dW = Q(RHT(dy^T), 1x16 along M, stochastic) . Q(RHT(x^T), 1x16 along M, nearest)^T

Each operand is ``e2m1 * e4m3_scale`` (exact in bf16) times a per-tensor factor, so every
GEMM is a plain GEMM in the compute dtype followed by one multiply with the two factors.
Forward saves the packed (4.5-bit) Wgrad copy of x, as TE does, not a bf16 copy of the input, and
the quantized W: its GEMM operand where the weight cache holds that until the next optimizer step
anyway, else packed. Bias and its gradient stay in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import NVFP4Recipe
from ..formats.quantized import GemmOperand
from ..formats.registry import get_format
from .cache import OperandCache, WeightCache
from .roles import QuantizerSpec, role_table


@dataclass(frozen=True, eq=False)
class GemmPlan:
    """What one call of the quantized linear does: a quantizer spec for each of the six roles
    (from the role table), the generator that stochastic rounding draws from, optionally an
    :class:`OperandCache` through which Linears fed the same input (q/k/v, gate/up) quantize it once,
    and optionally a :class:`WeightCache` that keeps a weight's quantized operands until it changes.
    ``weight_amax``: the weight's per-tensor amax when it is not its own (``fused_global_scale``:
    the joint amax of the layers a serving engine fuses with it); None: the weight's own.

    >>> from hf_nvfp4.ops import GemmPlan
    >>> GemmPlan.from_recipe(NVFP4Recipe(), fprop="bf16").roles["fprop_input"].format
    'bf16'
    """

    roles: dict[str, QuantizerSpec] = field(default_factory=lambda: role_table(NVFP4Recipe()))
    generator: torch.Generator | None = None
    cache: OperandCache | None = None
    weight_cache: WeightCache | None = None
    weight_amax: torch.Tensor | None = None

    @classmethod
    def from_recipe(cls, recipe: NVFP4Recipe, fprop: str | None = None, backward: str | None = None,
                    generator: torch.Generator | None = None, cache: OperandCache | None = None,
                    weight_cache: WeightCache | None = None, weight_amax: torch.Tensor | None = None) -> GemmPlan:
        return cls(role_table(recipe, fprop, backward), generator, cache, weight_cache, weight_amax)

    def high_precision(self) -> bool:
        return not any(get_format(s.format).quantizes for s in self.roles.values())


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _operand(x2: torch.Tensor, spec: QuantizerSpec, dtype, generator=None):
    """(values in dtype, per-tensor factor or None) for one GEMM operand, blocks along the last dim."""
    return get_format(spec.format).gemm_operand(x2, spec, dtype, generator)


def _weight_amax(plan: GemmPlan, spec: QuantizerSpec):
    """The weight's shared amax where its format has a per-tensor scale (None: the weight's own)."""
    if plan.weight_amax is None or not get_format(spec.format).per_tensor_amax:
        return None
    return plan.weight_amax


def _mm(a: torch.Tensor, b: torch.Tensor, ga, gb, out_dtype) -> torch.Tensor:
    if a.dtype == torch.float16 and (ga is not None or gb is not None):
        # fp16: the operands are exact in fp16 but reach 6 * 448 = 2688 before their
        # per-tensor factors, so one product is ~7e6, past fp16's 65504. GEMM and rescale in
        # fp32 (exact widening; outside autocast, which would cast back), round to the output once.
        alpha = (ga if ga is not None else 1.0) * (gb if gb is not None else 1.0)
        with torch.autocast(a.device.type, enabled=False):
            return ((a.float() @ b.float()) * alpha).to(out_dtype)
    out = a @ b
    if ga is not None or gb is not None:
        alpha = (ga if ga is not None else 1.0) * (gb if gb is not None else 1.0)
        if out.dtype == out_dtype:  # one pass; a 0-dim fp32 factor is applied in fp32, then rounded once
            return out.mul_(alpha)  # in place: a fresh output buffer would page-fault in a default process
        out = out.float() * alpha
    return out.to(out_dtype)


def _square(tile) -> bool:
    return tile is not None and tile[0] == tile[1] and tile[0] > 1


def _shares_weight(plan: GemmPlan) -> bool:
    """A square 2D tile is symmetric under transposition: Fprop and Dgrad can use one quantized W."""
    f, d = plan.roles["fprop_weight"], plan.roles["dgrad_weight"]
    return f == d and _square(f.tile)


def _shared(plan: GemmPlan, source: torch.Tensor, role: str, dtype, make):
    """``make()``, computed once for all Linears fed ``source`` when the plan carries a cache.

    Stochastic operands are never shared: each must draw its own noise.
    """
    spec = plan.roles[role]
    if plan.cache is None or spec.stochastic:
        return make()
    return plan.cache.get(source, (role, spec, dtype), make)


def _fprop_input(x: torch.Tensor, x2: torch.Tensor, plan: GemmPlan, dtype):
    return _shared(plan, x, "fprop_input", dtype,
                   lambda: _operand(x2, plan.roles["fprop_input"], dtype, plan.generator))


def _wgrad_input(x: torch.Tensor, x2: torch.Tensor, plan: GemmPlan, dtype):
    """What Wgrad needs: x^T with blocks along the tokens, quantized (and transformed) now."""
    spec = plan.roles["wgrad_input"]
    return _shared(plan, x, "wgrad_input", dtype,
                   lambda: get_format(spec.format).pack(x2.t(), spec, dtype, plan.generator))


def _weight_operand(weight: torch.Tensor, plan: GemmPlan, role: str, dtype, gen, transpose: bool = False,
                    training: bool = True):
    """``(values, factor)`` of the weight (or its transpose) for ``role``. Through the plan's weight
    cache it is made once per optimizer step, not once per forward (memory: one copy of the weight in
    the compute dtype, as TE keeps its FP8 weight copies). A weight scaled with a shared
    (``fused_global_scale``) amax is never cached: the amax moves with its siblings.
    """
    spec = plan.roles[role]
    source = weight.t() if transpose else weight
    amax = _weight_amax(plan, spec)

    def make():
        return get_format(spec.format).gemm_operand(source.detach(), spec, dtype, gen, amax)

    if plan.weight_cache is None or spec.stochastic or amax is not None:
        return make()
    return plan.weight_cache.get(weight, (role, spec, dtype, transpose, None), make, training=training)


def _kept_weight(weight: torch.Tensor, plan: GemmPlan, dtype, gen):
    """What Fprop and Dgrad share (square tiles): the quantized weight to save for backward and its
    GEMM operand. With the weight cache, the cache holds the operand until the next optimizer step
    anyway, so that operand is what is saved (no second decode in backward); without it, the packed
    weight is saved (4.5 bits an element, as TE keeps it) and decoded again for Dgrad."""
    spec, cache = plan.roles["fprop_weight"], plan.weight_cache
    amax = _weight_amax(plan, spec)
    if cache is not None and cache.enabled and amax is None:
        wv, gw = _weight_operand(weight, plan, "fprop_weight", dtype, gen)
        return GemmOperand(wv, gw), (wv, gw)
    kept = get_format(spec.format).pack(weight.detach(), spec, dtype, gen, amax)
    return kept, kept.operand(dtype)


def _forward_only(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan):
    """Fprop alone, outside autograd: no Wgrad copy of x, nothing packed for a backward."""
    dtype = _compute_dtype(x)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # quantize what a TE/nn.Linear GEMM receives under autocast
    xv, gx = _fprop_input(x, x2, plan, dtype)
    wv, gw = _weight_operand(weight, plan, "fprop_weight", dtype, plan.generator, training=False)
    y = _mm(xv, wv.t(), gx, gw, dtype)
    if bias is not None:
        y = y + bias.detach().to(dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, plan: GemmPlan):
        dtype = _compute_dtype(x)
        k = x.shape[-1]
        # Under autocast, quantize x cast to the compute dtype, as nn.Linear and TE (whose quantized
        # path does not cast, so the TE adapter casts first) do; the cache stays keyed on x itself.
        x2 = x.reshape(-1, k).to(dtype)
        shared = _shares_weight(plan)
        gen = plan.generator  # drawn from only by stochastic roles (forward ones: negative controls)
        xv, gx = _fprop_input(x, x2, plan, dtype)
        qw = None
        if shared:  # quantized once per step, for Fprop and Dgrad
            qw, (wv, gw) = _kept_weight(weight, plan, dtype, gen)
        else:
            wv, gw = _weight_operand(weight, plan, "fprop_weight", dtype, gen)
        y = _mm(xv, wv.t(), gx, gw, dtype)
        if bias is not None:
            y = y + bias.to(dtype)

        xt = _wgrad_input(x, x2, plan, dtype) if ctx.needs_input_grad[1] else None
        ctx.plan, ctx.dtype, ctx.shared = plan, dtype, shared
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        saved, ctx.kept = [weight], []
        for t in (xt, qw):  # quantized tensors hand over their tensors for saving (TE's interface)
            tensors, t = t.prepare_for_saving() if t is not None else ([], None)
            saved += tensors
            ctx.kept.append(t)
        ctx.save_for_backward(*saved)
        return y  # [M, N]: the caller reshapes, so the output is never a view of this Function's own

    @staticmethod
    def backward(ctx, dy):
        plan, dtype = ctx.plan, ctx.dtype
        roles = plan.roles
        weight, *saved = ctx.saved_tensors
        xt, qw = ctx.kept
        for t in (xt, qw):
            if t is not None:
                saved = t.restore_from_saved(saved)
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyv, gdy = _operand(dy2, roles["dgrad_grad_output"], dtype, plan.generator)
            wspec = roles["dgrad_weight"]
            if ctx.shared:
                wv, gw = qw.operand(dtype)
                dx = _mm(dyv, wv, gdy, gw, dtype)
            elif _square(wspec.tile):  # 2D tiles, but Fprop ran in another format
                wv, gw = _weight_operand(weight, plan, "dgrad_weight", dtype, plan.generator)
                dx = _mm(dyv, wv, gdy, gw, dtype)
            else:  # W quantized along N for Dgrad
                wtv, gwt = _weight_operand(weight, plan, "dgrad_weight", dtype, plan.generator, transpose=True)
                dx = _mm(dyv, wtv[:, :n].t(), gdy, gwt, dtype)
            # Dgrad and Wgrad write the compute dtype, then autograd's cast gives x's / W's dtype:
            # as nn.Linear under autocast and TE (module/linear.py, out_dtype=activation_dtype).
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dytv, gdyt = _operand(dy2.t(), roles["wgrad_grad_output"], dtype, plan.generator)
            xtv, gxt = xt.operand(dtype)
            dw = _mm(dytv, xtv.t(), gdyt, gxt, dtype).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(weight.dtype)
        return dx, dw, db, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: GemmPlan):
    """``F.linear`` with each GEMM operand quantized as the plan's role table says (emulated, bit-faithful)."""
    if plan.high_precision():
        dtype = _compute_dtype(x)
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _forward_only(x, weight, bias, plan)  # evaluation, generate(): no autograd graph to build
    # The reshape happens outside the Function: an output that is a view of a Function's result
    # cannot be modified in place (``out.add_(...)``, as Llama 4's MoE block does), a plain one can.
    y = _QuantizedLinear.apply(x, weight, bias, plan)
    return y.reshape(*x.shape[:-1], weight.shape[0])
