"""TE stand-in for transformer_engine/pytorch/module/linear.py: ``Linear`` (TE 2.20.0.dev0).

Same constructor signature and defaults (device="cuda", params_dtype=default dtype), the
checks of TransformerEngineBaseModule.prepare_forward / set_activation_dtype
(module/base.py), ``assert_dim_for_fp8_exec`` (utils.py) and the quantizers' shape and
dtype checks (csrc/quantizer.cpp), each with TE's message. The GEMMs are hf_nvfp4's
emulated ones, with the numerics the recipe asks for; combinations the stand-in does not
model raise NotImplementedError rather than compute something else.

Instrumentation (stand-in only): ``CALLS`` records (recipe class, input shape) per quantized
forward; ``CONSTRUCTED`` records the ``device`` each Linear was built with.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import transformer_engine
from hf_nvfp4.config import ROLES
from hf_nvfp4.formats.fp8 import default_pow2_scales
from hf_nvfp4.ops.linear import GemmPlan, quantized_linear
from hf_nvfp4.ops.roles import QuantizerSpec

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
        if inp.device.type != transformer_engine.DEVICE_TYPE:  # base.py prepare_forward
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
        if not FP8GlobalStateManager.is_fp8_enabled():
            return F.linear(inp.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        recipe = FP8GlobalStateManager.get_fp8_recipe()
        assert_dim_for_fp8_exec(inp, weight)
        gemm = self._gemm_recipe(recipe, inp.shape, dtype)
        CALLS.append((type(recipe).__name__, tuple(inp.shape)))
        return quantized_linear(inp, weight, bias, gemm)

    # -- what the recipe asks for, as the emulation's per-role quantizer specs ---------------------
    # Roles: fprop uses the rowwise input/weight, dgrad the rowwise grad and columnwise weight,
    # wgrad the columnwise grad and input. TE's NVFP4 applies RHT to columnwise data only.
    def _gemm_recipe(self, recipe, shape, dtype) -> GemmPlan:
        wshape = (self.out_features, self.in_features)
        if isinstance(recipe, NVFP4BlockScaling):
            if recipe.row_scaled_activation or recipe.nvfp4_4over6 != "none":
                raise NotImplementedError("TE stand-in: row-scaled and 4over6 NVFP4 are not modelled")
            if recipe.backward_override not in (None, "high_precision"):
                raise NotImplementedError("TE stand-in: backward_override='dequantized' is not modelled")
            qi, qw, qg = recipe.fp4_quant_fwd_inp, recipe.fp4_quant_fwd_weight, recipe.fp4_quant_bwd_grad
            NVFP4Quantizer(with_rht=qi.random_hadamard_transform).check_input(shape, dtype)
            NVFP4Quantizer(with_2d_quantization=qw.fp4_2d_quantization).check_input(wshape, dtype)
            w = _spec("nvfp4", (16, 16) if qw.fp4_2d_quantization else (1, 16))
            roles = {
                "fprop_input": _spec("nvfp4", (1, 16)),
                "fprop_weight": w,
                "dgrad_grad_output": _spec("nvfp4", (1, 16), stochastic=qg.stochastic_rounding),
                "dgrad_weight": w,
                "wgrad_grad_output": _spec(
                    "nvfp4", (1, 16), rht=qg.random_hadamard_transform, stochastic=qg.stochastic_rounding
                ),
                "wgrad_input": _spec("nvfp4", (1, 16), rht=qi.random_hadamard_transform),
            }
            if recipe.backward_override == "high_precision":  # backward GEMMs on the original operands
                roles.update({r: HIGH for r in roles if not r.startswith("fprop")})
            return GemmPlan(roles)
        if isinstance(recipe, (Float8CurrentScaling, Float8BlockScaling, MXFP8BlockScaling)):
            if recipe.fp8_format != Format.E4M3 or recipe.backward_override is not None:
                raise NotImplementedError("TE stand-in: only E4M3 FP8 without backward_override is modelled")
            if isinstance(recipe, MXFP8BlockScaling):
                for s in (shape, wshape):
                    if math.prod(s[:-1]) % 32 or s[-1] % 32:
                        raise RuntimeError(f"MXFP8 requires tensor dims that are divisible by 32 (got shape={list(s)})")
                if recipe.enable_2d_quantization:
                    raise NotImplementedError("TE stand-in: 2D MXFP8 is not modelled")
                return _uniform("mxfp8", (1, 32), (1, 32))
            qs = (recipe.fp8_quant_fwd_inp, recipe.fp8_quant_fwd_weight, recipe.fp8_quant_bwd_grad)
            pow2 = {q.power_2_scale for q in qs}
            if isinstance(recipe, Float8CurrentScaling):
                if pow2 != {False}:
                    raise NotImplementedError("TE stand-in: power-of-two current scaling is not modelled")
                return _uniform("fp8_tensor", None, None)
            if pow2 != {default_pow2_scales()} or recipe.x_block_scaling_dim != 1 or recipe.grad_block_scaling_dim != 1:
                raise NotImplementedError("TE stand-in: this Float8BlockScaling variant is not modelled")
            return _uniform("fp8_block", (1, 128), (128, 128) if recipe.w_block_scaling_dim == 2 else (1, 128))
        if isinstance(recipe, CustomRecipe):
            return self._custom(recipe, shape, wshape, dtype)
        raise NotImplementedError(f"TE stand-in: recipe {type(recipe).__name__} is not modelled")

    def _custom(self, recipe, shape, wshape, dtype) -> GemmPlan:
        # Linear.get_quantizer_roles: fwd [input, weight, output(None)], bwd [grad_output, grad_input(None)]
        name = self.name or ""
        q = {
            t: recipe.qfactory(QuantizerRole(module_type="linear", tensor_type=t, name=name))
            for t in ("input", "weight", "grad_output")
        }
        for slot in (recipe.qfactory(None), recipe.qfactory(None)):
            if slot is None:
                raise ValueError("TE stand-in: qfactory returned None (CustomRecipeState rejects it)")
        qi, qw, qg = q["input"], q["weight"], q["grad_output"]
        late = all(
            isinstance(h, HybridQuantizer)
            and isinstance(h.rowwise_quantizer, IdentityQuantizer)
            and isinstance(h.columnwise_quantizer, NVFP4Quantizer)
            for h in (qi, qw)
        ) and isinstance(qg, NVFP4Quantizer)
        if not late:
            raise NotImplementedError("TE stand-in: only the BF16-Fprop / NVFP4-backward CustomRecipe is modelled")
        ci, cw = qi.columnwise_quantizer, qw.columnwise_quantizer
        if ci.stochastic_rounding or cw.with_rht or cw.stochastic_rounding or qi.columnwise_source != "original":
            raise NotImplementedError("TE stand-in: this NVFP4 quantizer mix is not modelled")
        ci.check_input(shape, dtype)
        cw.check_input(wshape, dtype)
        qg.check_input((*shape[:-1], wshape[0]), dtype)
        return GemmPlan(
            {
                "fprop_input": HIGH,
                "fprop_weight": HIGH,
                "dgrad_grad_output": _spec("nvfp4", (1, 16), stochastic=qg.stochastic_rounding),
                "dgrad_weight": _spec("nvfp4", (16, 16) if cw.with_2d_quantization else (1, 16)),
                "wgrad_grad_output": _spec("nvfp4", (1, 16), rht=qg.with_rht, stochastic=qg.stochastic_rounding),
                "wgrad_input": _spec("nvfp4", (1, 16), rht=ci.with_rht),
            }
        )


def _spec(fmt: str, tile, rht: bool = False, stochastic: bool = False) -> QuantizerSpec:
    return QuantizerSpec(fmt, tile, rht, 16, stochastic)


HIGH = _spec("bf16", None)


def _uniform(fmt: str, act_tile, weight_tile) -> GemmPlan:
    return GemmPlan({r: _spec(fmt, weight_tile if r.endswith("weight") else act_tile) for r in ROLES})
