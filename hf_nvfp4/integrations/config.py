"""NVFP4Config: the HF quantization config of the recipe (``quant_method="hf_nvfp4"``).

A thin transformers wrapper: it holds one frozen :class:`~hf_nvfp4.config.NVFP4Recipe` and adds
``quant_method``. Its fields are the recipe's (``dataclasses.fields(NVFP4Recipe)``), read and
written through to the recipe, so every value is validated when it is set. The copy a converted
model carries in ``config.quantization_config`` is frozen.
"""

from __future__ import annotations

import inspect
import json

from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import FIELDS, NVFP4Recipe, check_fields, check_format

_READ_THROUGH = frozenset((*FIELDS, "resolved_bf16_blocks"))

QUANT_METHOD = "hf_nvfp4"  # transformers already owns "nvfp4" (an inference-only path)
__all__ = ["QUANT_METHOD", "NVFP4Config"]


class NVFP4Config(QuantizationConfigMixin):
    """The paper's NVFP4 training recipe as the HF quantization config ``quant_method="hf_nvfp4"``.

    Takes the fields of :class:`hf_nvfp4.NVFP4Recipe` (documented there), each with the paper's
    default; reading one gives the recipe's value (lists come back as tuples), setting one
    replaces the held recipe with a validated copy. ``to_recipe()`` gives the recipe.

    >>> from hf_nvfp4 import NVFP4Config
    >>> cfg = NVFP4Config(bf16_last_blocks=2)
    >>> NVFP4Config.from_dict(cfg.to_dict()) == cfg, cfg.bf16_last_blocks
    (True, 2)
    """

    def __init__(self, quant_method: str = QUANT_METHOD, **fields):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"NVFP4Config.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        check_fields(fields, "NVFP4Config")
        recipe = NVFP4Recipe(**fields)
        check_format(recipe, recipe.format, "NVFP4Config")
        object.__setattr__(self, "quant_method", QUANT_METHOD)
        object.__setattr__(self, "_recipe", recipe)
        object.__setattr__(self, "_frozen", False)

    __init__.__signature__ = inspect.Signature(  # help() and IDEs show the recipe's fields
        [inspect.Parameter("quant_method", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=QUANT_METHOD)]
        + [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
           for f in NVFP4Recipe.__dataclass_fields__.values()]
    )

    # The recipe's fields (and quant_method) are this class's dataclass fields, so dataclasses.fields(),
    # replace() and asdict() see the same list (without it they would see only the mixin's quant_method).
    __dataclass_fields__ = {"quant_method": QuantizationConfigMixin.__dataclass_fields__["quant_method"],
                            **NVFP4Recipe.__dataclass_fields__}

    def __getattr__(self, name):  # only called for names not found the usual way
        if name in _READ_THROUGH:
            return getattr(self.__dict__["_recipe"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"NVFP4Config.{name}: this config belongs to a converted model and is frozen; change the "
                "recipe with hf_nvfp4.set_recipe(model, " + f"{name}=...)"
            )
        if name not in FIELDS:
            raise AttributeError(f"NVFP4Config has no field {name!r}; valid fields are {sorted(FIELDS)}")
        recipe = self._recipe.replace(**{name: value})
        check_format(recipe, recipe.format, "NVFP4Config")
        object.__setattr__(self, "_recipe", recipe)

    def __eq__(self, other) -> bool:
        return isinstance(other, NVFP4Config) and other._recipe == self._recipe

    __hash__ = None

    def to_recipe(self) -> NVFP4Recipe:
        """The frozen recipe the layers compute with."""
        return self._recipe

    @classmethod
    def from_recipe(cls, recipe: NVFP4Recipe, *, frozen: bool = False) -> NVFP4Config:
        """The HF config of ``recipe``; ``frozen=True`` for the copy a converted model carries."""
        cfg = cls(**recipe.to_dict())
        object.__setattr__(cfg, "_frozen", frozen)
        return cfg

    def to_dict(self) -> dict:
        return {**self._recipe.to_dict(), "quant_method": QUANT_METHOD}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """Strict: an unknown key (a typo in a recipe or config.json) is an error naming it."""
        config = cls(**config_dict)
        return (config, kwargs) if return_unused_kwargs else config

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
