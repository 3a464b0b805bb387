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


def tiny_moe(arch: str, layers: int = 2, seed: int = 0, **overrides):
    """Tiny MoE causal LMs (8 experts, top-2, every dim a multiple of 16) whose experts use
    transformers' experts interface (3-D expert weights)."""
    from transformers import DeepseekV3Config, GptOssConfig, MixtralConfig, Qwen3MoeConfig

    torch.manual_seed(seed)
    base = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers)
    moe = dict(num_experts_per_tok=2)
    if arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=8, head_dim=16, **moe, **base)
    elif arch == "mixtral":
        cfg = MixtralConfig(intermediate_size=64, num_local_experts=8, **moe, **base)
    elif arch == "deepseek_v3":
        base["num_key_value_heads"] = 4
        cfg = DeepseekV3Config(
            intermediate_size=128,
            moe_intermediate_size=32,
            n_routed_experts=8,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            q_lora_rank=32,
            kv_lora_rank=32,
            qk_rope_head_dim=16,
            qk_nope_head_dim=16,
            v_head_dim=16,
            **moe,
            **base,
        )
    elif arch == "gpt_oss":
        cfg = GptOssConfig(intermediate_size=64, num_local_experts=8, head_dim=16, **moe, **base)
    elif arch == "nemotron_h_moe":  # relu2 experts without a gate (has_gate=False)
        cfg = NemotronHConfig(
            layers_block_type=(["mamba", "attention", "moe"] * layers)[:layers],
            intermediate_size=128,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
            n_routed_experts=8,
            head_dim=16,
            mamba_num_heads=4,
            mamba_head_dim=16,
            ssm_state_size=16,
            n_groups=1,
            **moe,
            **base,
        )
    else:
        raise ValueError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AutoModelForCausalLM.from_config(cfg)
