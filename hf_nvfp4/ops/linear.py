"""The emulated NVFP4 Linear: Fprop, Dgrad and Wgrad exactly as the paper's recipe.

With y = x W^T, x: [M tokens, K], W: [N, K]:

    Fprop  y  = Q(x, 1x16, nearest) . Q(W, 16x16, nearest)^T
    Dgrad  dx = Q(dy, 1x16 along N, stochastic) . Q(W, 16x16)       (the same quantized W)
    Wgrad  dW = Q(RHT(dy^T), 1x16 along M, stochastic) . Q(RHT(x^T), 1x16 along M, nearest)^T

Each operand is ``e2m1 * e4m3_scale`` (exact in bf16) times a per-tensor factor, so every
GEMM is a plain GEMM in the compute dtype followed by one multiply with the two factors.
Forward saves what TE saves: the packed (4.5-bit) Wgrad copy of x and the packed W, not a
bf16 copy of the input. Bias and its gradient stay in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.nvfp4 import NVFP4Tensor, nvfp4_gemm_operand, nvfp4_operand_from_packed, quantize_nvfp4
from ..formats.registry import get_format

FP4 = ("nvfp4", "mxfp4")


@dataclass(eq=False)
class GemmRecipe:
    """What one call of the quantized linear does.

    fprop / backward: format names for the forward GEMM and for Dgrad + Wgrad ("bf16" is
    plain high precision). rht, stochastic and two_d apply where the format has them.
    """

    fprop: str = "nvfp4"
    backward: str = "nvfp4"
    rht: bool = True
    stochastic: bool = True
    two_d: bool = True
    rht_size: int = 16
    generator: torch.Generator | None = None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _operand(x2, fmt: str, weight_2d: bool, dtype, *, rht=False, stochastic=False, recipe=None):
    """(values in dtype, per-tensor factor or None) for one GEMM operand, blocks along the last dim."""
    if fmt == "bf16":
        return x2.to(dtype), None
    rht = rht and fmt in FP4
    stochastic = stochastic and fmt in FP4
    gen = recipe.generator if stochastic else None
    if fmt == "nvfp4":
        tile = (16, 16) if weight_2d else (1, 16)
        return nvfp4_gemm_operand(
            x2, tile=tile, rht=rht, stochastic=stochastic, generator=gen, rht_size=recipe.rht_size, dtype=dtype
        )
    f = get_format(fmt)
    tile = f.weight_tile if weight_2d else f.act_tile
    return f.fake_quantize(x2, tile=tile, rht=rht, stochastic=stochastic, generator=gen).to(dtype), None


def _mm(a: torch.Tensor, b: torch.Tensor, ga, gb, out_dtype) -> torch.Tensor:
    if a.dtype == torch.float16 and (ga is not None or gb is not None):
        # fp16 (issue 11): the operands are exact in fp16 but reach 6 * 448 = 2688 before their
        # per-tensor factors, so one product is ~7e6, past fp16's 65504. GEMM and rescale in
        # fp32 (exact widening; outside autocast, which would cast back), round to the output once.
        alpha = (ga if ga is not None else 1.0) * (gb if gb is not None else 1.0)
        with torch.autocast(a.device.type, enabled=False):
            return ((a.float() @ b.float()) * alpha).to(out_dtype)
    out = a @ b
    if ga is not None or gb is not None:
        alpha = (ga if ga is not None else 1.0) * (gb if gb is not None else 1.0)
        if out.dtype == out_dtype:  # one pass; a 0-dim fp32 factor is applied in fp32, then rounded once
            return torch.mul(out, alpha)
        out = out.float() * alpha
    return out.to(out_dtype)


def _shares_weight(recipe: GemmRecipe) -> bool:
    """2D tiles are symmetric under transposition, so Fprop and Dgrad can use one quantized W."""
    return recipe.two_d and recipe.fprop == recipe.backward and recipe.fprop in ("nvfp4", "fp8_block")


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: GemmRecipe):
        dtype = _compute_dtype(x)
        k = x.shape[-1]
        x2 = x.reshape(-1, k)
        shared = _shares_weight(recipe)
        xv, gx = _operand(x2, recipe.fprop, False, dtype, recipe=recipe)
        qw = None
        if shared and recipe.fprop == "nvfp4":
            qw = quantize_nvfp4(weight, tile=(16, 16))  # once per step, for Fprop and Dgrad
            wv, gw = nvfp4_operand_from_packed(qw, dtype)
        else:
            weight_2d = recipe.two_d and recipe.fprop in ("nvfp4", "fp8_block")
            wv, gw = _operand(weight, recipe.fprop, weight_2d, dtype, recipe=recipe)
            if shared:
                qw = wv
        y = _mm(xv, wv.t(), gx, gw, dtype)
        if bias is not None:
            y = y + bias.to(dtype)

        # What Wgrad needs: x^T with blocks along the tokens, quantized (and transformed) now.
        if not ctx.needs_input_grad[1]:
            xt = None
        elif recipe.backward == "nvfp4":
            xt = quantize_nvfp4(x2.t(), rht=recipe.rht, rht_size=recipe.rht_size)
        else:
            xt = _operand(x2.t(), recipe.backward, False, dtype, rht=recipe.rht, recipe=recipe)[0]
        ctx.recipe, ctx.dtype, ctx.shared = recipe, dtype, shared
        ctx.x_shape, ctx.x_dtype, ctx.has_bias = x.shape, x.dtype, bias is not None
        ctx.xt_packed = isinstance(xt, NVFP4Tensor)
        ctx.qw_packed = isinstance(qw, NVFP4Tensor)
        saved = [weight]
        for t in (xt, qw):
            saved += [t.data, t.scale, t.amax] if isinstance(t, NVFP4Tensor) else [t]
        ctx.save_for_backward(*saved)
        ctx.packed_meta = (
            (xt.shape, xt.tile, xt.rht) if ctx.xt_packed else None,
            (qw.shape, qw.tile, qw.rht) if ctx.qw_packed else None,
        )
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        recipe, dtype = ctx.recipe, ctx.dtype
        saved = list(ctx.saved_tensors)
        weight = saved.pop(0)
        xt = (
            NVFP4Tensor(saved.pop(0), saved.pop(0), saved.pop(0), *ctx.packed_meta[0])
            if ctx.xt_packed
            else saved.pop(0)
        )
        qw = (
            NVFP4Tensor(saved.pop(0), saved.pop(0), saved.pop(0), *ctx.packed_meta[1])
            if ctx.qw_packed
            else saved.pop(0)
        )
        n = weight.shape[0]
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dyv, gdy = _operand(dy2, recipe.backward, False, dtype, stochastic=recipe.stochastic, recipe=recipe)
            if ctx.shared:
                wv, gw = nvfp4_operand_from_packed(qw, dtype) if ctx.qw_packed else (qw, None)
                dx = _mm(dyv, wv, gdy, gw, ctx.x_dtype)
            elif recipe.two_d and recipe.backward in ("nvfp4", "fp8_block"):  # Fprop ran in another format
                wv, gw = _operand(weight, recipe.backward, True, dtype, recipe=recipe)
                dx = _mm(dyv, wv, gdy, gw, ctx.x_dtype)
            else:  # W quantized along N for Dgrad
                wtv, gwt = _operand(weight.t(), recipe.backward, False, dtype, recipe=recipe)
                dx = _mm(dyv, wtv[:, :n].t(), gdy, gwt, ctx.x_dtype)
            dx = dx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dytv, gdyt = _operand(
                dy2.t(), recipe.backward, False, dtype, rht=recipe.rht, stochastic=recipe.stochastic, recipe=recipe
            )
            xtv, gxt = nvfp4_operand_from_packed(xt, dtype) if ctx.xt_packed else (xt, None)
            dw = _mm(dytv, xtv.t(), gdyt, gxt, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(weight.dtype)
        return dx, dw, db, None


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, recipe: GemmRecipe):
    """``F.linear`` with each GEMM in the recipe's formats (emulated, bit-faithful)."""
    if recipe.fprop == "bf16" and recipe.backward == "bf16":
        dtype = _compute_dtype(x)
        return torch.nn.functional.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    if not torch.is_grad_enabled():  # inference (e.g. generate()): no Wgrad operand to prepare
        weight = weight.detach()
    return _QuantizedLinear.apply(x, weight, bias, recipe)
