"""NVFP4Config: the one object that is both the training recipe and the HF quantization config."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields

from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "hf_nvfp4"  # transformers already owns "nvfp4" (an inference-only path)
BACKENDS = ("auto", "emulated", "te")
PRECISIONS = ("nvfp4", "mxfp4", "fp8_block", "fp8_tensor", "mxfp8", "bf16")
PAPER_BF16_SHARE = 0.15


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
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"NVFP4Config.quant_method must be {QUANT_METHOD!r}, got {self.quant_method!r}")
        for name in ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"NVFP4Config.{name} must be True or False, got {getattr(self, name)!r}")
        r = self.rht_size
        if not isinstance(r, int) or isinstance(r, bool) or r < 2 or r & (r - 1):
            raise ValueError(f"NVFP4Config.rht_size must be a power of two >= 2 (the paper uses 16), got {r!r}")
        for name in ("bf16_first_blocks", "bf16_last_blocks", "seed"):
            v = getattr(self, name)
            if v is None and name == "bf16_last_blocks":
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                allowed = "an int >= 0 or None (the paper's ~15%)" if name == "bf16_last_blocks" else "an int >= 0"
                raise ValueError(f"NVFP4Config.{name} must be {allowed}, got {v!r}")
        if isinstance(self.modules_to_not_convert, str):
            self.modules_to_not_convert = [self.modules_to_not_convert]
        if self.modules_to_not_convert is None:
            self.modules_to_not_convert = []
        if not all(isinstance(m, str) for m in self.modules_to_not_convert):
            raise ValueError(
                f"NVFP4Config.modules_to_not_convert must be a list of names or glob patterns, "
                f"got {self.modules_to_not_convert!r}"
            )
        self.modules_to_not_convert = list(self.modules_to_not_convert)
        if self.backend not in BACKENDS:
            raise ValueError(f"NVFP4Config.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.format not in PRECISIONS:
            raise ValueError(f"NVFP4Config.format must be one of {PRECISIONS}, got {self.format!r}")

    def resolved_bf16_blocks(self, n_blocks: int) -> tuple[int, int]:
        """(first, last) block counts kept in BF16 for a model with ``n_blocks`` blocks."""
        if n_blocks == 0:
            return 0, 0
        last = self.bf16_last_blocks
        if last is None:
            last = max(1, round(PAPER_BF16_SHARE * n_blocks))
        first = min(self.bf16_first_blocks, n_blocks)
        return first, min(last, n_blocks - first)

    def to_dict(self) -> dict:
        return copy.deepcopy(asdict(self))

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
