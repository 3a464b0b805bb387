"""hf-nvfp4: NVIDIA's NVFP4 pretraining recipe for the Hugging Face stack.

Importing the package is cheap (``hf-nvfp4 --help`` needs neither torch nor transformers): the
public names below load their modules on first use. ``quant_method="hf_nvfp4"`` is registered
with transformers as soon as transformers' model code is loaded (at once if it already is), so
``import hf_nvfp4`` before ``from_pretrained`` is all it takes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

# public name -> module that defines it (relative to this package)
_EXPORTS = {
    "DiagnoseCallback": ".science.diagnose",
    "diagnose": ".science.diagnose",
    "FORMATS": ".formats.registry",
    "get_format": ".formats.registry",
    "LMEvalCallback": ".integrations.lm_eval",
    "evaluate_lm": ".integrations.lm_eval",
    "export_nvfp4": ".integrations.export",
    "FP8ShadowCallback": ".integrations.shadow",
    "PrecisionSwitchCallback": ".integrations.callbacks",
    "QuantHealthCallback": ".integrations.callbacks",
    "NVFP4Config": ".integrations.config",
    "NVFP4Linear": ".nn",
    "NVFP4Plugin": ".integrations.accelerate",
    "NVFP4Recipe": ".config",
    "NVFP4State": ".nn",
    "set_recipe": ".nn",
    "convert_model": ".nn",
    "coverage": ".nn.coverage",
    "set_precision": ".nn",
    "unconvert_model": ".nn",
    "NVFP4Tensor": ".formats.nvfp4",
    "fake_quantize_nvfp4": ".formats.nvfp4",
    "quantize_nvfp4": ".formats.nvfp4",
    "from_config": ".integrations.transformers",
    "hadamard_transform": ".formats.hadamard",
    "set_compile_mode": ".formats._compile",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)  # a subpackage: hf_nvfp4.nn, ...
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


# -- registration with transformers ----------------------------------------------------------------
# transformers has no plugin entry points: its quantizer registry is two dicts. A converted or loaded
# transformers model needs transformers.modeling_utils, so registering right after that module is
# executed covers every use without importing transformers (4 s of CPU) for the command line.
_TRIGGER = "transformers.modeling_utils"


def _register() -> None:
    try:
        from .integrations.transformers import register
    except ImportError as exc:  # a transformers too old or too new for the integration
        logging.getLogger("hf_nvfp4").warning("hf_nvfp4: cannot register with transformers: %s", exc)
        return
    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``_TRIGGER`` to register once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)  # one use; the real finders do the finding
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _register()

            spec.loader.exec_module = exec_module
        return spec


if _TRIGGER in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
