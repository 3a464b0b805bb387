"""One forward+backward of an MoE block (8 experts, top-2): NVFP4 experts vs BF16 grouped_mm / eager.

    python benchmarks/moe_block.py [--hidden 1024] [--intermediate 512] [--tokens 1024] [--experts 8] [--top-k 2]

transformers' Qwen3-MoE sparse block (router + experts with 3-D weights), the same weights,
inputs and routing for every variant, one process, best of N steps after warm-up. All
parameters and activations are bf16 (transformers' grouped_mm does not autocast, so bf16
weights are its fair setting). Variants, selected through the experts interface
(``config._experts_implementation``): ``grouped_mm`` and ``eager`` (transformers' BF16
implementations) and ``hf_nvfp4`` (every expert GEMM in NVFP4: Fprop, Dgrad and Wgrad,
emulated). Also printed: bytes of the tensors autograd saves for backward.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def saved_bytes(block, x) -> int:
    """Bytes autograd saves for backward; views of parameters (an expert's weight) cost nothing."""
    total = 0
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x).float().square().mean().backward()
    block.zero_grad(set_to_none=True)
    return total


def step_time(block, x, device, repeats) -> tuple[float, float]:
    """(best forward+backward seconds, best forward-only seconds)."""

    def fwd_bwd():
        block(x).float().square().mean().backward()
        block.zero_grad(set_to_none=True)

    def fwd():
        with torch.no_grad():
            block(x)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = []
    for fn in (fwd_bwd, fwd):
        for _ in range(2):
            fn()
        b = float("inf")
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            b = min(b, time.perf_counter() - t)
        best.append(b)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=512, help="per-expert intermediate size")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("_HF_NVFP4_BENCH") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, _HF_NVFP4_BENCH="1", **WARM_ENV))

    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    import hf_nvfp4

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    base = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0.0, 0.02)
    base = base.to(args.device, torch.bfloat16)
    x = torch.randn(1, args.tokens, args.hidden, device=args.device, dtype=torch.bfloat16, requires_grad=True)

    variants = {}
    for impl in ("grouped_mm", "eager"):
        b = copy.deepcopy(base)
        b.experts.config._experts_implementation = impl
        variants[f"BF16 {impl}"] = b
    variants["NVFP4 hf_nvfp4 (emulated)"] = hf_nvfp4.convert_model(
        copy.deepcopy(base), hf_nvfp4.NVFP4Config(bf16_last_blocks=0)
    )
    with torch.no_grad():
        idx = base.gate(x.reshape(-1, args.hidden))[2]
    load = torch.bincount(idx.reshape(-1), minlength=args.experts).tolist()
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} hidden={args.hidden} "
        f"intermediate={args.intermediate} tokens={args.tokens} experts={args.experts} top_k={args.top_k} "
        f"tokens per expert={load}"
    )
    rows = []
    for name, block in variants.items():
        t, tf = step_time(block, x, args.device, args.repeats)
        rows.append((name, t, tf, saved_bytes(block, x) / 2**20))
    t0, f0, m0 = rows[0][1], rows[0][2], rows[0][3]
    print(f"{'variant':28s} {'fwd+bwd':>10s} {'vs gmm':>7s} {'fwd':>10s} {'vs gmm':>7s} {'saved':>10s} {'vs gmm':>7s}")
    for name, t, tf, mem in rows:
        print(
            f"{name:28s} {t * 1e3:8.1f}ms {t / t0:6.2f}x {tf * 1e3:8.1f}ms {tf / f0:6.2f}x "
            f"{mem:8.1f}MiB {mem / m0:6.2f}x"
        )


if __name__ == "__main__":
    main()
