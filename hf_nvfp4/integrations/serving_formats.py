"""The two NVFP4 serving layouts the export writes: tensor names, scale directions, configs.

compressed-tensors ``nvfp4-pack-quantized`` (vLLM's ``compressed_tensors_w4a4_nvfp4`` /
``_w4a16_nvfp4`` schemes; transformers' ``CompressedTensorsHfQuantizer``), per Linear:

    weight_packed        uint8 [out, in/2]   two E2M1 codes a byte, even element in the low nibble
    weight_scale         float8_e4m3fn [out, in/16]
    weight_global_scale  fp32 [1]   2688 / amax: the *encode* factor (our s_enc)
    input_global_scale   fp32 [1]   2688 / activation amax (W4A4 only)
    dequantized weight = code * weight_scale / weight_global_scale

NVIDIA ModelOpt's unified HF checkpoint (``hf_quant_config.json``; vLLM's ``modelopt`` NVFP4
methods, TensorRT-LLM), per Linear:

    weight               uint8 [out, in/2]   the same packed codes
    weight_scale         float8_e4m3fn [out, in/16]
    weight_scale_2       fp32 scalar   amax / 2688: the *decode* factor (our s_dec)
    input_scale          fp32 scalar   activation amax / 2688 (W4A4 only)
    dequantized weight = code * weight_scale * weight_scale_2
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..formats._common import FLT_MAX
from ..formats.nvfp4 import TENSOR_SCALE, NVFP4Tensor

FORMATS = ("compressed-tensors", "modelopt")
SCHEMES = ("NVFP4A16", "NVFP4")
SHARD_BYTES = 5 * 10**9  # transformers' default shard size


def encode_scale(amax: torch.Tensor) -> torch.Tensor:
    """2688 / amax in fp32, exactly as quantize_nvfp4 computes its encode factor (1.0 for amax 0)."""
    s = torch.clamp(torch.div(TENSOR_SCALE, amax.float()), max=FLT_MAX)
    return torch.where(s == 0, torch.ones_like(s), s)


def decode_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 2688 in fp32: the factor the training GEMM applies (1.0 for amax 0, whose codes are all 0)."""
    a = amax.float()
    return torch.where(a == 0, torch.ones_like(a), a / TENSOR_SCALE)


def layer_tensors(fmt: str, name: str, q: NVFP4Tensor, act_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear ``name``."""
    data, scale = q.data.cpu(), q.scale.cpu()
    if fmt == "compressed-tensors":
        t = {
            f"{name}.weight_packed": data,
            f"{name}.weight_scale": scale,
            f"{name}.weight_global_scale": encode_scale(q.amax).reshape(1).cpu(),
        }
        if act_amax is not None:
            t[f"{name}.input_global_scale"] = encode_scale(act_amax).reshape(1).cpu()
        return t
    t = {f"{name}.weight": data, f"{name}.weight_scale": scale, f"{name}.weight_scale_2": decode_scale(q.amax).cpu()}
    if act_amax is not None:
        t[f"{name}.input_scale"] = decode_scale(act_amax).cpu()
    return t


def quant_config(fmt: str, scheme: str, ignore: list[str], version: str) -> tuple[dict, dict | None]:
    """(config.json ``quantization_config``, ``hf_quant_config.json`` or None).

    compressed-tensors: the ``NVFP4A16`` / ``NVFP4`` presets of ``quantization/quant_scheme.py``
    as compressed-tensors serializes them. ModelOpt: ``hf_quant_config.json`` as its unified
    export writes it, and its compressed-tensors-style copy in config.json (``quant_method:
    modelopt``). ModelOpt's own W4A4 algorithm is ``NVFP4``; weight-only is ``W4A16_NVFP4``.
    """
    w4a4 = scheme == "NVFP4"
    producer = {"name": "hf_nvfp4", "version": version}
    if fmt == "compressed-tensors":
        weights = {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": 16,
            "strategy": "tensor_group",
            "dynamic": False,
            "scale_dtype": "torch.float8_e4m3fn",
        }
        acts = dict(weights, dynamic="local", observer="static_minmax") if w4a4 else None
        group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}
        return {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": ignore,
            "kv_cache_scheme": None,
            "producer": producer,
        }, None
    algo = "NVFP4" if w4a4 else "W4A16_NVFP4"
    hf_quant = {
        "producer": producer,
        "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16, "exclude_modules": ignore},
    }
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    group = {"weights": args, "input_activations": dict(args) if w4a4 else None, "targets": ["Linear"]}
    return {
        "quant_method": "modelopt",
        "quant_algo": algo,
        "group_size": 16,
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "producer": producer,
    }, hf_quant


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path) -> int:
    """``model.safetensors`` (or shards plus the index, as transformers writes them); returns bytes on disk."""
    from huggingface_hub import save_torch_state_dict

    # huggingface_hub refuses a tensor that is a slice of a larger storage (per-expert slices of a
    # stacked experts weight): give each such tensor storage of its own.
    own = {k: t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()
           for k, t in tensors.items()}
    save_torch_state_dict(own, out, max_shard_size=SHARD_BYTES)
    return sum(p.stat().st_size for p in out.glob("model*.safetensors"))
