"""Fake-quantize a 4096x4096 bf16 tensor (NVFP4, 1x16, nearest): ours vs torchao vs clone.

    python benchmarks/quantize.py [--size 4096] [--repeats 20] [--device cpu|cuda]

All timings are best-of-N after warm-up, in one process. The script re-executes itself
once with glibc told to keep freed memory (MALLOC_MMAP_THRESHOLD_ etc.), so every
32 MiB result lands on memory that is already mapped: a "warm" allocation for every
contender alike. Without that each allocation page-faults and the clone floor measures
the kernel's page-fault path instead of memory bandwidth. Pass --no-warm-malloc to see it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

WARM_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 34),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
    "MALLOC_TOP_PAD_": str(1 << 29),
}


def best_of(fn, repeats: int, device: str) -> float:
    for _ in range(3):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def torchao_fn(x):
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception as exc:  # noqa: BLE001
        print(f"torchao: not available ({type(exc).__name__}); skipping")
        return None

    def run():
        s = per_tensor_amax_to_scale(x.abs().amax().float())
        return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=s).dequantize(x.dtype)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-warm-malloc", action="store_true")
    args = ap.parse_args()
    if not args.no_warm_malloc and args.device == "cpu" and os.environ.get("_HF_NVFP4_BENCH") != "1":
        env = dict(os.environ, _HF_NVFP4_BENCH="1", **WARM_ENV)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import hf_nvfp4

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size, dtype=torch.bfloat16, device=args.device)
    print(
        f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"shape={tuple(x.shape)} bf16, warm-malloc={os.environ.get('_HF_NVFP4_BENCH') == '1'}"
    )
    hf_nvfp4.set_compile_mode("1")
    t0 = time.perf_counter()
    hf_nvfp4.fake_quantize_nvfp4(x)
    print(f"first call (compile or cache load): {time.perf_counter() - t0:.1f} s")

    times = {
        "hf_nvfp4 fused": best_of(lambda: hf_nvfp4.fake_quantize_nvfp4(x), 2 * args.repeats, args.device),
        "clone": best_of(lambda: x.clone(), args.repeats, args.device),
    }
    hf_nvfp4.set_compile_mode("0")
    times["hf_nvfp4 eager"] = best_of(lambda: hf_nvfp4.fake_quantize_nvfp4(x), max(3, args.repeats // 5), args.device)
    hf_nvfp4.set_compile_mode("auto")
    ao = torchao_fn(x)
    if ao is not None:
        times["torchao NVFP4Tensor"] = best_of(ao, max(3, args.repeats // 5), args.device)

    ours, clone = times["hf_nvfp4 fused"], times["clone"]
    gbytes = 2 * x.numel() * x.element_size() / 1e9  # read x, write the result
    for name, t in times.items():
        print(f"{name:22s} {t * 1e3:9.2f} ms  {gbytes / t:8.1f} GB/s  {t / ours:7.2f}x ours")
    print(f"ours / clone   = {ours / clone:.2f}x   (target <= 10x)")
    if ao is not None:
        print(f"torchao / ours = {times['torchao NVFP4Tensor'] / ours:.1f}x   (target >= 25x)")


if __name__ == "__main__":
    main()
