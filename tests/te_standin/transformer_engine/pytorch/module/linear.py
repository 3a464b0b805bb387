"""TE stand-in for pytorch/module/linear.py (d0067d0da): ``Linear`` as a contract.

Same constructor signature and defaults (device="cuda", params_dtype=default dtype). Each
behaviour below is TE's, read at d0067d0da (line numbers in module/linear.py unless named):

- set_activation_dtype (module/base.py:1482-1500): native autocast's dtype wins; outside it the
  parameters must have the input's dtype.
- assert_dim_for_fp8_exec(inp, weight) before a quantized forward (:375-376; utils.py:614-624).
- The quantized path quantizes the input as it arrives, without the AMP cast (:426-437; the cast
  is only in the unquantized branch, :439), and the weight from the parameter itself (:478-488).
- Quantizer preconditions on the tensors actually passed (NVFP4Quantizer.check_input: dims,
  RHT's bf16 input) and the cast itself (the stand-in's _numerics.py, never hf_nvfp4).
- GEMM preconditions (common/gemm/cublaslt_gemm.cu): an FP4 GEMM cannot write fp16 (:430-431);
  high-precision operands of different dtypes find no cuBLAS algorithm (:770); an FP4 GEMM's K
  (packed, two elements a byte) must keep cuBLAS's 16-byte leading-dim alignment, K % 32
  (the tensor-core requirement TE cites at :208; TE's reference GEMM checks it,
  custom_recipes/reference_nvfp4.py:1197-1198).
- Dgrad and Wgrad write the activation dtype (:1093, :1250-1254); autograd then casts each
  gradient to its tensor's dtype. Fprop writes the activation dtype (:540).

Combinations the stand-in does not model raise NotImplementedError rather than compute
something else. Instrumentation (stand-in only): ``CALLS`` records (TE recipe class, input
shape) per quantized forward; ``CONSTRUCTED`` the ``device`` each Linear was built with;
``GEMMS`` (GEMM name, operand dtypes or formats, output dtype) per GEMM.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_engine

from ... import _numerics as N
from ...common.recipe import (
    CustomRecipe,
    Float8BlockScaling,
    Float8CurrentScaling,
    Format,
    MXFP8BlockScaling,
    NVFP4BlockScaling,
)
from ..quantization import FP8GlobalStateManager, QuantizerRole
from ..tensor.hybrid_tensor import HybridQuantizer
from ..tensor.identity_tensor import IdentityQuantizer
from ..tensor.nvfp4_tensor import NVFP4Quantizer
from ..utils import assert_dim_for_fp8_exec

CALLS: list[tuple[str, tuple[int, ...]]] = []
CONSTRUCTED: list[str] = []
GEMMS: list[tuple[str, str, str, torch.dtype]] = []


def _device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":  # the stand-in's "GPU"
        return torch.device(transformer_engine.DEVICE_TYPE)
    return dev


class Linear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        sequence_parallel: bool = False,
        fuse_wgrad_accumulation: bool = False,
        tp_group=None,
        tp_size: int = 1,
        get_rng_state_tracker=None,
        rng_tracker_name=None,
        init_method=None,
        bias: bool = True,
        return_bias: bool = False,
        params_dtype: torch.dtype | None = None,
        parallel_mode: str | None = None,
        parameters_split=None,
        device="cuda",
        ub_overlap_ag: bool = False,
        ub_overlap_rs: bool = False,
        ub_overlap_rs_dgrad: bool = False,
        ub_bulk_dgrad: bool = False,
        ub_bulk_wgrad: bool = False,
        ub_name: str | None = None,
        delay_wgrad_compute: bool = False,
        symmetric_ar_type: str | None = None,
        save_original_input: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        modelled = dict(
            sequence_parallel=False,
            fuse_wgrad_accumulation=False,
            tp_group=None,
            tp_size=1,
            return_bias=False,
            parallel_mode=None,
            parameters_split=None,
            ub_overlap_ag=False,
            ub_overlap_rs=False,
            ub_overlap_rs_dgrad=False,
            ub_bulk_dgrad=False,
            ub_bulk_wgrad=False,
            delay_wgrad_compute=False,
            symmetric_ar_type=None,
            save_original_input=False,
        )
        given = locals()
        off = [k for k, v in modelled.items() if given[k] != v]
        if off:
            raise NotImplementedError(f"TE stand-in: {off} are not modelled")
        params_dtype = torch.get_default_dtype() if params_dtype is None else params_dtype
        self.in_features, self.out_features, self.use_bias, self.name = in_features, out_features, bias, name
        CONSTRUCTED.append(str(device))
        dev = _device(device)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=dev, dtype=params_dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=dev, dtype=params_dtype))
        else:
            self.bias = torch.Tensor().to(dtype=params_dtype, device=dev)
        self.activation_dtype = None
        if dev.type != "meta":  # reset_parameters(defer_init=False): TE's default init, from the device RNG
            with torch.no_grad():
                (init_method or (lambda w: nn.init.normal_(w, mean=0.0, std=0.023)))(self.weight)
                if bias:
                    self.bias.zero_()

    def _set_activation_dtype(self, inp: torch.Tensor) -> None:
        if torch.is_autocast_enabled(transformer_engine.DEVICE_TYPE):  # TE: native AMP wins
            self.activation_dtype = torch.get_autocast_dtype(transformer_engine.DEVICE_TYPE)
            return
        if self.activation_dtype == inp.dtype:
            return
        for name, param in self.named_parameters():
            if param is not None and inp.dtype != param.dtype:
                raise TypeError(
                    "Data types for parameters must match when outside of autocasted "
                    f"region. Found input dtype: {inp.dtype} and {name!r} dtype: {param.dtype}"
                )
        self.activation_dtype = inp.dtype

    def forward(self, inp: torch.Tensor, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
        if fp8_output or fp8_grad:
            raise NotImplementedError("TE stand-in: fp8_output / fp8_grad are not modelled")
        if inp.device.type != transformer_engine.DEVICE_TYPE:  # module/base.py:1604-1608
            raise RuntimeError(f"TransformerEngine needs CUDA. Got input on device: {inp.device}")
        self._set_activation_dtype(inp)
        weight = self.weight
        bias = self.bias if self.use_bias else None
        out_features, in_features = weight.shape
        assert inp.shape[-1] == in_features, "GEMM not possible"
        for t in (weight, bias):  # stand-in: TE would fail inside the GEMM instead
            if t is not None and t.device != inp.device:
                raise RuntimeError(f"TE stand-in: a parameter is on {t.device}, the input on {inp.device}")
        dtype = self.activation_dtype
        if not FP8GlobalStateManager.is_fp8_enabled():  # cast_if_needed for AMP (:439, :493)
            return F.linear(inp.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        recipe = FP8GlobalStateManager.get_fp8_recipe()
        assert_dim_for_fp8_exec(inp, weight)
        qi, qw, qg = self._quantizers(recipe)
        CALLS.append((type(recipe).__name__, tuple(inp.shape)))
        y = _QuantizedLinear.apply(inp, weight, qi, qw, qg, dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        return y

    # -- the TE recipe's quantizers per tensor role ------------------------------------------
    def _quantizers(self, recipe):
        if isinstance(recipe, NVFP4BlockScaling):
            if recipe.row_scaled_activation or recipe.nvfp4_4over6 != "none":
                raise NotImplementedError("TE stand-in: row-scaled and 4over6 NVFP4 are not modelled")
            if recipe.backward_override is not None:
                raise NotImplementedError("TE stand-in: backward_override is not modelled")
            # quantization.py:1700-1745: one NVFP4Quantizer per role from the recipe's QParams
            def make(qp):
                return NVFP4Quantizer(
                    with_rht=qp.random_hadamard_transform,
                    with_post_rht_amax=qp.random_hadamard_transform,
                    with_2d_quantization=qp.fp4_2d_quantization,
                    stochastic_rounding=qp.stochastic_rounding,
                )

            return make(recipe.fp4_quant_fwd_inp), make(recipe.fp4_quant_fwd_weight), make(recipe.fp4_quant_bwd_grad)
        if isinstance(recipe, (Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling)):
            if recipe.fp8_format != Format.E4M3 or recipe.backward_override is not None:
                raise NotImplementedError("TE stand-in: only E4M3 FP8 without backward_override is modelled")
            if isinstance(recipe, MXFP8BlockScaling):
                if recipe.enable_2d_quantization:
                    raise NotImplementedError("TE stand-in: 2D MXFP8 is not modelled")
                return (_FP8Quantizer("mxfp8"),) * 3
            qs = (recipe.fp8_quant_fwd_inp, recipe.fp8_quant_fwd_weight, recipe.fp8_quant_bwd_grad)
            pow2 = {q.power_2_scale for q in qs}
            if len(pow2) != 1 or any(q.amax_epsilon for q in qs):
                raise NotImplementedError("TE stand-in: mixed scale rules / amax_epsilon are not modelled")
            pow2 = pow2.pop()
            if isinstance(recipe, Float8CurrentScaling):
                if pow2:
                    raise NotImplementedError("TE stand-in: power-of-two current scaling is not modelled")
                return (_FP8Quantizer("tensor"),) * 3
            if recipe.x_block_scaling_dim != 1 or recipe.grad_block_scaling_dim != 1:
                raise NotImplementedError("TE stand-in: 2D activation / gradient blocks are not modelled")
            w = _FP8Quantizer("block", (128, 128) if recipe.w_block_scaling_dim == 2 else (1, 128), pow2)
            a = _FP8Quantizer("block", (1, 128), pow2)
            return a, w, a
        if isinstance(recipe, CustomRecipe):
            return self._custom(recipe)
        raise NotImplementedError(f"TE stand-in: recipe {type(recipe).__name__} is not modelled")

    def _custom(self, recipe):
        # CustomRecipeState (quantization.py:1853-1925) calls qfactory once per role:
        # fwd [input, weight, output], bwd [grad_output, grad_input]
        name = self.name or ""
        q = {
            t: recipe.qfactory(QuantizerRole(module_type="linear", tensor_type=t, name=name))
            for t in ("input", "weight", "output", "grad_output", "grad_input")
        }
        if any(v is None for v in q.values()):
            raise ValueError("TE stand-in: qfactory returned None (CustomRecipeState rejects it)")
        for t in ("input", "weight"):
            h = q[t]
            ok = isinstance(h, HybridQuantizer) and isinstance(h.columnwise_quantizer, NVFP4Quantizer)
            if not ok or not isinstance(h.rowwise_quantizer, IdentityQuantizer) or h.columnwise_source != "original":
                raise NotImplementedError("TE stand-in: only the high-precision-Fprop / NVFP4-backward mix is modelled")
        if not isinstance(q["grad_output"], NVFP4Quantizer):
            raise NotImplementedError("TE stand-in: only an NVFP4 grad_output quantizer is modelled")
        return q["input"], q["weight"], q["grad_output"]


class _FP8Quantizer:
    """Float8CurrentScalingQuantizer / Float8BlockQuantizer / MXFP8Quantizer, as far as the stand-in
    needs: rowwise = the tensor's own blocks, columnwise = its transpose's (the stand-in's _numerics.py)."""

    def __init__(self, kind: str, tile=None, pow2: bool = False) -> None:
        self.kind, self.tile, self.pow2 = kind, tile, pow2

    def _q(self, t):
        if self.kind == "tensor":
            return N.fp8_tensor(t)
        if self.kind == "block":
            return N.fp8_block(t, self.tile, self.pow2)
        rows, cols = t.shape
        if rows % 32 or cols % 32:  # csrc/quantizer.cpp:1513-1515
            raise RuntimeError(f"MXFP8 requires tensor dims that are divisible by 32 (got shape={list(t.shape)})")
        return N.mxfp8(t)

    def quantize(self, t):
        return self._q(t), self._q(t.t().contiguous())


def _gemm(name: str, a, b, out_dtype: torch.dtype) -> torch.Tensor:
    """One GEMM of the stand-in, ``a @ b^T``: quantized operands (N.Q) or high-precision tensors."""
    quantized = isinstance(a, N.Q)
    if quantized != isinstance(b, N.Q):
        raise NotImplementedError("TE stand-in: mixed quantized / high-precision GEMM operands are not modelled")
    if not quantized:
        if a.dtype != b.dtype:  # common/gemm/cublaslt_gemm.cu:765-772
            raise RuntimeError("Unable to find suitable cuBLAS GEMM algorithm")
        GEMMS.append((name, str(a.dtype), out_dtype))
        with torch.autocast(a.device.type, enabled=False):
            return (a @ b.t()).to(out_dtype)
    GEMMS.append((name, "quantized", out_dtype))
    return N.gemm(a, b, out_dtype)


def _check_fp4_gemm(name: str, a, k: int, out_dtype: torch.dtype) -> None:
    if isinstance(a, N.Q) and getattr(a, "fp4", False):
        if out_dtype == torch.float16:  # common/gemm/cublaslt_gemm.cu:430-431
            raise RuntimeError("FP4 GEMM does not support FP16 output!")
        if k % 32:  # 16-byte leading dims of packed FP4 (reference_nvfp4.py:1197-1198)
            raise RuntimeError(f"TE stand-in: {name} FP4 GEMM with K={k}: cuBLAS needs K divisible by 32")


def _q(quantizer, t: torch.Tensor):
    row, col = quantizer.quantize(t)
    if isinstance(quantizer, NVFP4Quantizer) or isinstance(getattr(quantizer, "columnwise_quantizer", None),
                                                           NVFP4Quantizer):
        for x in (row, col):
            if isinstance(x, N.Q):
                x.fp4 = True
    return row, col


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inp, weight, qi, qw, qg, dtype):
        x2 = inp.reshape(-1, inp.shape[-1])  # quantized as it arrives (:426-437)
        xr, xc = _q(qi, x2)
        wr, wc = _q(qw, weight)  # from the parameter itself (:478-488)
        m, k = x2.shape
        _check_fp4_gemm("Fprop", xr, k, dtype)
        y = _gemm("fprop", xr, wr, dtype)
        ctx.saved = (xc, wc, qg, dtype, inp.shape, weight.shape)
        return y.reshape(*inp.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xc, wc, qg, dtype, x_shape, w_shape = ctx.saved
        n = w_shape[0]
        dy2 = dy.reshape(-1, n)
        gr, gc = _q(qg, dy2)
        _check_fp4_gemm("Dgrad", gr, n, dtype)
        dx = _gemm("dgrad", gr, wc, dtype).reshape(x_shape)  # out_dtype=activation_dtype (:1093)
        _check_fp4_gemm("Wgrad", gc, dy2.shape[0], dtype)
        dw = _gemm("wgrad", gc, xc, dtype)  # out_dtype=activation_dtype (:1250-1254)
        return dx, dw, None, None, None, None
