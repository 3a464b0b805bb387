"""NVFP4Config: the HF quantization config of the recipe (``quant_method="hf_nvfp4"``).

The core (formats/ops/nn) knows nothing of transformers: it computes with the frozen
:class:`~hf_nvfp4.ops.recipe.NVFP4Recipe`, which this config converts to (``to_recipe()``).
The copy a converted model carries in ``config.quantization_config`` is frozen too.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats.registry import PRECISIONS
from ..ops.recipe import (
    BACKENDS,
    PAPER_RHT_GEMMS,
    PAPER_STOCHASTIC_ROLES,
    NVFP4Recipe,
    check_format,
    validate_fields,
)

QUANT_METHOD = "hf_nvfp4"  # transformers already owns "nvfp4" (an inference-only path)
__all__ = ["BACKENDS", "PRECISIONS", "QUANT_METHOD", "NVFP4Config"]


@dataclass
class NVFP4Config(QuantizationConfigMixin):
    """The paper's NVFP4 training recipe, and the HF quantization config ``quant_method="hf_nvfp4"``.

    Every field has the paper's default.

    disable_rht / disable_stochastic_rounding / disable_2d_quantization: TE's flags; each
        turns off exactly its part of the recipe (RHT on Wgrad inputs, stochastic rounding
        of gradients, 16x16 weight tiles).
    rht_size: Hadamard size for the Wgrad operands (16; the paper found 16 as good as 128).
    bf16_first_blocks / bf16_last_blocks: whole transformer blocks kept in BF16. None for
        bf16_last_blocks means the paper's advice: about 15% of the blocks, at the end, at
        least one.
    modules_to_not_convert: module names or glob patterns left in high precision
        (embeddings and the LM head never convert).
    backend: "auto" (Transformer Engine where it can train NVFP4, else emulated),
        "emulated" or "te".
    format: "nvfp4", or a comparison format run through the same machinery
        ("mxfp4", "fp8_block", "fp8_tensor", "mxfp8", "bf16").
    seed: seed of the stochastic-rounding stream.
    rht_gemms / stochastic_roles: where RHT and stochastic rounding go. The defaults are the
        paper's (RHT on the Wgrad GEMM, SR on the two gradient operands); anything else is a
        negative control for ablations (emulated backend only).
    fused_global_scale: False (TE's behaviour): every layer has its own weight tensor scale.
        True: the layers a serving engine runs as one GEMM (q/k/v, gate/up, found from the
        model's structure: siblings that read the same input) share one, from their joint amax,
        so the served weights are exactly the trained ones (emulated backend only).

    >>> from hf_nvfp4 import NVFP4Config
    >>> cfg = NVFP4Config(bf16_last_blocks=2)
    >>> NVFP4Config.from_dict(cfg.to_dict()) == cfg
    True
    """

    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    rht_size: int = 16
    bf16_first_blocks: int = 0
    bf16_last_blocks: int | None = None
    modules_to_not_convert: list[str] = field(default_factory=list)
    backend: str = "auto"
    format: str = "nvfp4"
    seed: int = 0
    rht_gemms: list[str] = field(default_factory=lambda: list(PAPER_RHT_GEMMS))
    stochastic_roles: list[str] = field(default_factory=lambda: list(PAPER_STOCHASTIC_ROLES))
    fused_global_scale: bool = False
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name, value) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"NVFP4Config.{name}: this config belongs to a converted model and is frozen; change the "
                "recipe with hf_nvfp4.set_recipe(model, " + f"{name}=...)"
            )
        super().__setattr__(name, value)

    def validate(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"NVFP4Config.quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        mods = self.modules_to_not_convert
        mods = [mods] if isinstance(mods, str) else [] if mods is None else mods
        object.__setattr__(self, "modules_to_not_convert", mods)  # normalising only: allowed when frozen
        if not isinstance(self.modules_to_not_convert, (list, tuple)) or not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise ValueError(
                f"NVFP4Config.modules_to_not_convert must be a list of names, prefixes or glob patterns, "
                f"got {self.modules_to_not_convert!r}"
            )
        object.__setattr__(self, "modules_to_not_convert", list(self.modules_to_not_convert))
        for name in ("rht_gemms", "stochastic_roles"):
            v = getattr(self, name)
            object.__setattr__(self, name, [v] if isinstance(v, str) else list(v) if isinstance(v, tuple) else v)
        validate_fields(self, "NVFP4Config")
        check_format(self, self.format, "NVFP4Config")

    def to_recipe(self) -> NVFP4Recipe:
        """The frozen recipe the layers compute with (validated again: the fields may have changed)."""
        self.validate()
        d = {k: v for k, v in self.to_dict().items() if k != "quant_method"}
        return NVFP4Recipe(**d)

    @classmethod
    def from_recipe(cls, recipe: NVFP4Recipe, *, frozen: bool = False) -> NVFP4Config:
        """The HF config of ``recipe``; ``frozen=True`` for the copy a converted model carries."""
        cfg = cls(**recipe.to_dict())
        if frozen:
            object.__setattr__(cfg, "_frozen", True)
        return cfg

    def resolved_bf16_blocks(self, n_blocks: int) -> tuple[int, int]:
        """(first, last) block counts kept in BF16 for a model with ``n_blocks`` blocks."""
        return self.to_recipe().resolved_bf16_blocks(n_blocks)

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """Strict: an unknown key (a typo in a recipe or config.json) is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config_dict) - known)
        if unknown:
            raise ValueError(f"NVFP4Config: unknown field(s) {unknown}; valid fields are {sorted(known)}")
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
