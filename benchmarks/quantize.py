"""Fake-quantize a 4096x4096 bf16 tensor (NVFP4, 1x16, nearest): ours vs torchao vs clone.

    python benchmarks/quantize.py [--size 4096] [--repeats 9] [--device cpu|cuda]

One default process (no allocator settings: every 32 MiB result is fresh memory, for every
contender alike). The contenders are timed in interleaved rounds, one call of each per round, so a
busy machine slows them alike; reported: the median time of each and the medians of the per-round
ratios (ours / clone, torchao / ours). torchao comes with the ``bench`` extra
(``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def torchao_fn(x):
    try:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
    except Exception as exc:  # noqa: BLE001
        print(f"torchao: not available ({type(exc).__name__}: {exc}); pip install -e .[bench]")
        return None

    def run():
        s = per_tensor_amax_to_scale(x.abs().amax().float())
        return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=s).dequantize(x.dtype)

    return run


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    import hf_nvfp4

    torch.manual_seed(0)
    x = torch.randn(args.size, args.size, dtype=torch.bfloat16, device=args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"shape={tuple(x.shape)} bf16, repeats={args.repeats}, "
          f"load average={load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")
    t0 = time.perf_counter()
    hf_nvfp4.fake_quantize_nvfp4(x)
    print(f"first call (compile or cache load): {time.perf_counter() - t0:.1f} s")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    contenders = {"hf_nvfp4 fused": lambda: hf_nvfp4.fake_quantize_nvfp4(x), "clone": lambda: x.clone()}
    ao = torchao_fn(x)
    if ao is not None:
        contenders["torchao NVFP4Tensor"] = ao
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(args.repeats):
        for k, fn in contenders.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t)
    mode = hf_nvfp4.formats._compile.get_compile_mode()
    hf_nvfp4.set_compile_mode("0")  # the same bits without torch.compile, for scale (three calls)
    try:
        eager = [time.perf_counter(), hf_nvfp4.fake_quantize_nvfp4(x), time.perf_counter()]
        eager_s = eager[2] - eager[0]
    finally:
        hf_nvfp4.set_compile_mode(mode)

    ours = times["hf_nvfp4 fused"]
    gbytes = 2 * x.numel() * x.element_size() / 1e9  # read x, write the result
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:22s} {v * 1e3:9.2f} ms  {gbytes / v:8.2f} GB/s  {v / med['hf_nvfp4 fused']:7.2f}x ours")
    print(f"{'hf_nvfp4 eager (1 run)':22s} {eager_s * 1e3:9.2f} ms")
    res = {"ours_ms": med["hf_nvfp4 fused"] * 1e3,
           "ours_over_clone": statistics.median(a / b for a, b in zip(ours, times["clone"], strict=True))}
    print(f"ours / clone   = {res['ours_over_clone']:.2f}x  (median of per-round ratios; target <= 8x)")
    if ao is not None:
        res["torchao_over_ours"] = statistics.median(a / b for a, b in zip(times["torchao NVFP4Tensor"], ours,
                                                                          strict=True))
        print(f"torchao / ours = {res['torchao_over_ours']:.1f}x  (median of per-round ratios; target >= 25x)")
    return res


if __name__ == "__main__":
    main()
