"""hf-nvfp4: NVIDIA's NVFP4 pretraining recipe for the Hugging Face stack."""

from .config import NVFP4Recipe
from .formats._compile import set_compile_mode
from .formats.hadamard import hadamard_transform
from .formats.nvfp4 import NVFP4Tensor, fake_quantize_nvfp4, quantize_nvfp4
from .formats.registry import FORMATS, get_format
from .integrations.accelerate import NVFP4Plugin
from .integrations.callbacks import PrecisionSwitchCallback, QuantHealthCallback
from .integrations.config import NVFP4Config
from .integrations.export import export_nvfp4
from .integrations.lm_eval import LMEvalCallback, evaluate_lm
from .integrations.shadow import FP8ShadowCallback
from .integrations.transformers import from_config
from .integrations.transformers import register as _register_with_transformers
from .nn import NVFP4Linear, NVFP4State, convert_model, set_precision, set_recipe, unconvert_model
from .nn.coverage import coverage
from .science.diagnose import DiagnoseCallback, diagnose

__version__ = "0.1.0"
_register_with_transformers()
__all__ = [
    "DiagnoseCallback",
    "diagnose",
    "FORMATS",
    "LMEvalCallback",
    "evaluate_lm",
    "export_nvfp4",
    "FP8ShadowCallback",
    "PrecisionSwitchCallback",
    "QuantHealthCallback",
    "NVFP4Config",
    "NVFP4Linear",
    "NVFP4Plugin",
    "NVFP4Recipe",
    "NVFP4State",
    "set_recipe",
    "convert_model",
    "coverage",
    "set_precision",
    "unconvert_model",
    "NVFP4Tensor",
    "get_format",
    "fake_quantize_nvfp4",
    "from_config",
    "hadamard_transform",
    "quantize_nvfp4",
    "set_compile_mode",
]
