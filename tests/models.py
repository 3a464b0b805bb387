"""Tiny HF causal LMs built from configs (no downloads)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, NemotronHConfig, Qwen2Config, Qwen3Config

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def tiny(arch: str = "llama", layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(num_hidden_layers=layers, **COMMON)
    elif arch == "qwen2":
        cfg = Qwen2Config(num_hidden_layers=layers, **COMMON)
    elif arch == "qwen3":
        cfg = Qwen3Config(num_hidden_layers=layers, head_dim=16, **COMMON)
    elif arch == "mistral":
        cfg = MistralConfig(num_hidden_layers=layers, **COMMON)
    elif arch == "nemotron_h":
        pattern = (["mamba", "attention", "mlp"] * layers)[:layers]
        cfg = NemotronHConfig(
            num_hidden_layers=layers,
            layers_block_type=pattern,
            head_dim=16,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=1,
            **COMMON,
        )
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg)
