"""Coverage table for MoE architectures: share of matmul weights / per-token matmul FLOPs in NVFP4.

    python tools/moe_coverage.py            # transformers' config-class defaults (real model sizes)
    python tools/moe_coverage.py --tiny     # the tiny test-sized configs (hidden 64, 8 experts, top-2)
    python tools/moe_coverage.py --all      # every MoE model type in the installed transformers (defaults)

Models are built on the meta device (shapes only, no memory, no download) and converted
three ways: Linear layers only (what the plugin covered before experts support, emulated
with ``modules_to_not_convert=["*.experts"]``), every block in NVFP4
(``bf16_last_blocks=0``), and the default recipe (~15% of the blocks at the end in BF16).
Embeddings, the LM head and routers are excluded from the denominator.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    NemotronHConfig,
    Qwen3MoeConfig,
)

import hf_nvfp4

ARCHS = {
    "Qwen3-MoE": Qwen3MoeConfig,
    "Mixtral": MixtralConfig,
    "DeepSeek-V3": DeepseekV3Config,
    "gpt-oss": GptOssConfig,
    "Nemotron-H (MoE)": NemotronHConfig,
}
TINY_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=2,
    num_experts_per_tok=2,
)
TINY = {
    "Qwen3-MoE": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8, head_dim=16),
    "Mixtral": dict(intermediate_size=64, num_local_experts=8),
    "DeepSeek-V3": dict(
        num_key_value_heads=4,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
    ),
    "gpt-oss": dict(intermediate_size=64, num_local_experts=8, head_dim=16),
    "Nemotron-H (MoE)": dict(
        num_hidden_layers=3,
        layers_block_type=["mamba", "attention", "moe"],
        intermediate_size=128,
        moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=32,
        n_routed_experts=8,
        head_dim=16,
        mamba_num_heads=4,
        mamba_head_dim=16,
        ssm_state_size=16,
        n_groups=1,
    ),
}
RECIPES = {
    "Linear only (before)": hf_nvfp4.NVFP4Config(bf16_last_blocks=0, modules_to_not_convert=["*.experts"]),
    "every block": hf_nvfp4.NVFP4Config(bf16_last_blocks=0),
    "default recipe": hf_nvfp4.NVFP4Config(),
}


MOE_MARKERS = re.compile(r"use_experts_implementation|num_local_experts|n_routed_experts|\bnum_experts\b")


def moe_model_types() -> list[str]:
    """Model types whose modeling file mentions experts (found in the installed transformers' sources)."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    found = []
    for d in sorted(root.iterdir()):
        files = sorted(d.glob("modeling_*.py"))
        if any(MOE_MARKERS.search(f.read_text(errors="replace")) for f in files):
            found.append(d.name)
    return found


def build_meta(model_type: str):
    """The model of ``model_type`` from its config class's defaults, on the meta device (or why not)."""
    from transformers import CONFIG_MAPPING, AutoModel, AutoModelForSeq2SeqLM

    if model_type not in CONFIG_MAPPING:
        return None, "no config registered under this model type"
    cfg = CONFIG_MAPPING[model_type]()
    errors = []
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for c, auto in [(cfg, AutoModelForCausalLM), (cfg, AutoModelForSeq2SeqLM), (cfg, AutoModel),
                    *([(text, AutoModelForCausalLM), (text, AutoModel)] if text is not cfg else [])]:
        try:
            with torch.device("meta"):
                return auto.from_config(c), None
        except Exception as exc:  # noqa: BLE001 - report why, try the next head
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    return None, errors[-1]


def measure_all(types: list[str] | None = None) -> None:
    """One row per MoE model type: every block in NVFP4 and the default recipe, weights / FLOPs."""
    print("| model type | every block: weights / FLOPs | default recipe | experts via | left in BF16 (every block) |")
    print("|---|---|---|---|---|")
    for mt in types or moe_model_types():
        try:
            model, why = build_meta(mt)
        except Exception as exc:  # noqa: BLE001
            model, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if model is None:
            print(f"| {mt} | not built: {why} | | | |")
            continue
        cells, kept, via = [], "", ""
        for name in ("every block", "default recipe"):
            hf_nvfp4.unconvert_model(model)
            try:
                hf_nvfp4.convert_model(model, RECIPES[name])
            except Exception as exc:  # noqa: BLE001
                cells.append(f"not converted: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
                continue
            cov = hf_nvfp4.coverage(model)
            cells.append(f"{100 * cov.weight_share:.1f}% / {100 * cov.flop_share:.1f}%")
            if name == "every block":
                kept = "; ".join(f"{k} ({len(v)})" for k, v in cov.high_precision().items()) or "nothing"
                via = ", ".join(sorted({e.via for e in cov.entries if e.via})) or "-"
        print(f"| {mt} | " + " | ".join(cells) + f" | {via} | {kept} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny test-sized configs instead of the class defaults")
    ap.add_argument("--all", action="store_true", help="every MoE model type in the installed transformers")
    ap.add_argument("--types", nargs="*", help="with --all: only these model types")
    args = ap.parse_args()
    logging.getLogger("hf_nvfp4").setLevel(logging.ERROR)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.all:
        measure_all(args.types)
        return
    cols = " | ".join(f"{r}: weights / FLOPs" for r in RECIPES)
    print(f"| architecture | config | {cols} | left in BF16 (every block) |")
    print("|---" * (3 + len(RECIPES)) + "|")
    for arch, cls in ARCHS.items():
        cfg = cls(**{**TINY_COMMON, **TINY[arch]}) if args.tiny else cls()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        cells, kept = [], ""
        for name, recipe in RECIPES.items():
            hf_nvfp4.unconvert_model(model)
            hf_nvfp4.convert_model(model, recipe)
            cov = hf_nvfp4.coverage(model)
            cells.append(f"{100 * cov.weight_share:.1f}% / {100 * cov.flop_share:.1f}%")
            if name == "every block":
                kept = "; ".join(f"{k} ({len(v)})" for k, v in cov.high_precision().items()) or "nothing"
        n_layers = getattr(cfg, "num_hidden_layers", "?")
        desc = "tiny" if args.tiny else "class default"
        print(f"| {arch} | {desc}, {n_layers} layers | " + " | ".join(cells) + f" | {kept} |")


if __name__ == "__main__":
    main()
