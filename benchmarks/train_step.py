"""One forward+backward (bf16 autocast) of a 2-block Llama: NVFP4 recipe vs unconverted.

    python benchmarks/train_step.py [--hidden 1024] [--intermediate 2816] [--seq 512] [--batch 2]

Same model, same weights, same batch, one process; best of N steps after warm-up. Memory:
bytes of the tensors autograd saves for backward (activation memory), and on CUDA the
peak allocated memory too. Variants: the full recipe with its default BF16 blocks (with 2
blocks, the last one stays BF16), and every block in NVFP4.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def saved_bytes(model, ids, device) -> int:
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device, dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def step_time(model, ids, device, repeats) -> tuple[float, float]:
    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return best, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.device == "cpu" and os.environ.get("_HF_NVFP4_BENCH") != "1":
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, _HF_NVFP4_BENCH="1", **WARM_ENV))

    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_nvfp4

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=2,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    base = LlamaForCausalLM(cfg).to(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    variants = {
        "unconverted (bf16 autocast)": base,
        "NVFP4 recipe (default BF16 blocks)": hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config()),
        "NVFP4 every block": hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config(bf16_last_blocks=0)),
    }
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"hidden={args.hidden} intermediate={args.intermediate} seq={args.seq} batch={args.batch} vocab={args.vocab}"
    )
    rows = []
    for name, model in variants.items():
        t, peak = step_time(model, ids, args.device, args.repeats)
        rows.append((name, t, saved_bytes(model, ids, args.device) / 2**20, peak))
    t0, m0 = rows[0][1], rows[0][2]
    print(f"{'variant':36s} {'step':>10s} {'vs base':>8s} {'saved acts':>11s} {'vs base':>8s} {'peak':>9s}")
    for name, t, mem, peak in rows:
        print(f"{name:36s} {t * 1e3:8.1f}ms {t / t0:7.2f}x {mem:9.1f}MiB {mem / m0:7.2f}x {peak:7.1f}MiB")


if __name__ == "__main__":
    main()
