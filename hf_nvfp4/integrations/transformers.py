"""NVFP4Config as a transformers quantization config, with a matching HfQuantizer.

After ``import hf_nvfp4``, ``from_pretrained(path, quantization_config=NVFP4Config())``
converts the model's Linear layers while it is still on the meta device; the weights
then load as plain master weights. ``save_pretrained`` writes the recipe into config.json
(``quant_method: hf_nvfp4``) and no extra state keys, and loading that directory again
converts with the stored recipe. transformers has no plugin entry points: without the
import it stops with "Unknown quantization type, got hf_nvfp4".
"""

from __future__ import annotations

# From the submodules, not the packages: register() may run while transformers.modeling_utils is
# still being imported (see hf_nvfp4/__init__.py), when the packages' names are not bound yet.
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..nn import convert as _convert
from ..nn.convert import convert_model, unconvert_model
from .config import QUANT_METHOD, NVFP4Config


class NVFP4HfQuantizer(HfQuantizer):
    """Converts on load; weights stay plain, so it is trainable and serializable."""

    requires_calibration = False

    def __init__(self, quantization_config: NVFP4Config, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = NVFP4Config.from_dict(quantization_config)
        # The model computes with a frozen copy: later edits of the user's object cannot reach it.
        recipe = quantization_config.to_recipe()
        super().__init__(NVFP4Config.from_recipe(recipe, frozen=True), **kwargs)

    def validate_environment(self, *args, **kwargs) -> None:
        return None

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # master weights load unchanged

    def _process_model_before_weight_loading(self, model, **kwargs):
        return convert_model(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model, **kwargs):
        state = getattr(model, "nvfp4_state", None)
        if state is not None:  # transformers may have set the caller's config object meanwhile
            attach_quantizer(model, state)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        return unconvert_model(model)


def register() -> None:
    """Register config, quantizer and experts implementation under ``"hf_nvfp4"``, and mark every
    converted model (idempotent)."""
    if attach_quantizer not in _convert.ON_CONVERT:
        _convert.ON_CONVERT.append(attach_quantizer)
    if detach_quantizer not in _convert.ON_UNCONVERT:
        _convert.ON_UNCONVERT.append(detach_quantizer)
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not NVFP4Config:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(NVFP4Config)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not NVFP4HfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(NVFP4HfQuantizer)
    from .experts import register_experts  # MoE: the "hf_nvfp4" experts implementation

    register_experts()


def attach_quantizer(model, state) -> None:
    """Mark a converted transformers model as from_pretrained would (frozen config, quantizer):
    Trainer, save_pretrained (config.json records the recipe) and dequantize() then work."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return  # not a transformers model: nothing to mark
    frozen = NVFP4Config.from_recipe(state.recipe, frozen=True)
    quantizer = getattr(model, "hf_quantizer", None)
    if isinstance(quantizer, NVFP4HfQuantizer):
        quantizer.quantization_config = frozen
    else:
        model.hf_quantizer = NVFP4HfQuantizer(frozen)
    config.quantization_config = frozen
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def detach_quantizer(model) -> None:
    """Undo attach_quantizer (after unconvert_model): the model is plain again."""
    if isinstance(getattr(model, "hf_quantizer", None), NVFP4HfQuantizer):
        model.hf_quantizer = None
        model.is_quantized = False
        model.__dict__.pop("quantization_method", None)
        config = getattr(model, "config", None)
        if isinstance(getattr(config, "quantization_config", None), NVFP4Config):
            del config.quantization_config


def from_config(config, nvfp4_config: NVFP4Config | None = None, **kwargs):
    """Build a fresh model from an architecture config and convert it: pretraining from scratch.

    transformers' ``from_config`` takes no quantization config (and silently ignores one set
    on the config), so this is the from-scratch twin of ``from_pretrained(...,
    quantization_config=NVFP4Config())``, returning the same kind of model.

    >>> import hf_nvfp4
    >>> from transformers import LlamaConfig
    >>> cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                   num_attention_heads=4, vocab_size=256)
    >>> model = hf_nvfp4.from_config(cfg, hf_nvfp4.NVFP4Config())
    >>> model.config.quantization_config.quant_method
    'hf_nvfp4'
    """
    nvfp4_config = nvfp4_config or NVFP4Config()
    if not isinstance(nvfp4_config, NVFP4Config):
        raise TypeError(f"from_config: nvfp4_config must be an NVFP4Config, got {type(nvfp4_config).__name__}")
    if "quantization_config" in kwargs:
        raise TypeError("from_config: pass the recipe as nvfp4_config, not quantization_config")
    from transformers import AutoModelForCausalLM

    recipe = nvfp4_config.to_recipe()  # bad options fail before the model is built
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return convert_model(model, recipe)
