"""The ``"hf_nvfp4"`` entry of transformers' experts registry (``ALL_EXPERTS_FUNCTIONS``).

Conversion (:func:`hf_nvfp4.convert_model`, so also ``from_config`` and
``from_pretrained(..., quantization_config=NVFP4Config())``) sets
``config._experts_implementation = "hf_nvfp4"`` for models whose experts use
``@use_experts_implementation``. Every experts module of such a model then calls
:func:`nvfp4_experts_forward`: converted modules run the recipe
(:func:`hf_nvfp4.nn.experts.experts_forward`); modules left in high precision (kept blocks,
``modules_to_not_convert``) and modules switched to bf16 run the implementation the model
used before (``grouped_mm``, ``eager``, ...).
"""

from __future__ import annotations

import torch

from ..nn.experts import EXPERTS_IMPLEMENTATION, experts_forward
from ..nn.fused import tracing


def _interface():
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:  # transformers < 5: no experts interface, experts stay unsupported
        return None
    return ALL_EXPERTS_FUNCTIONS


def _fallback(module: torch.nn.Module):
    rec = getattr(module, "nvfp4_experts", None)
    name = rec.fallback if rec is not None else "grouped_mm"
    if name == "eager":
        return type(module).forward.__wrapped__  # the original forward, kept by functools.wraps
    return _interface()[name]


def nvfp4_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' experts contract: [T, H] states, [T, k] indices and weights -> [T, H]."""
    rec = getattr(self, "nvfp4_experts", None)
    if tracing():  # finding fused Linear groups on fake tensors: the experts' values do not matter
        down = self.down_proj
        return hidden_states.new_zeros(hidden_states.shape[0], down.shape[2] if self.is_transposed else down.shape[1])
    if rec is None or rec.high_precision:
        return _fallback(self)(self, hidden_states, top_k_index, top_k_weights)
    return experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register_experts() -> bool:
    """Register :func:`nvfp4_experts_forward` under ``"hf_nvfp4"`` (idempotent); False without the interface."""
    registry = _interface()
    if registry is None:
        return False
    type(registry).register(EXPERTS_IMPLEMENTATION, nvfp4_experts_forward)
    return True
