"""GPU check: CUDA quantizers bit-identical to the CPU, CUDA training matches the CPU, and speed.

    python benchmarks/gpu_check.py            # on a machine with one CUDA GPU: under 5 minutes
    python benchmarks/gpu_check.py --quick    # the reduced form (what the CPU test runs)

1. Quantizers: a fixed set of tensors (shapes incl. odd and 3D ones, fp32/bf16/fp16, 1x16 and
   16x16 tiles, RHT on transposed Wgrad operands, stochastic rounding with a fixed CPU generator
   state: the SR seeds are drawn on the generator's device and the hash is integer arithmetic, so
   CPU and CUDA draw the same noise) quantized on the GPU and on the CPU: every bit must agree.
   The Hadamard transform has a fixed summation order (docs/numerics.md), so it is compared too.
2. Training: a small Llama, the same weights, batch and seed, a few AdamW steps with every block in
   NVFP4 (stochastic rounding off, so only GEMM accumulation order differs) on CUDA and on the
   CPU: the losses must agree to 2% at every step.
3. Speed: quantizer GB/s (bytes read + written) against a device-to-device copy of the same tensor
   (the bandwidth this device reaches), and the every-block training-step and no-grad forward
   ratios of a 2-block Llama at hidden 4096 (benchmarks/train_step.py's method).

Without CUDA (reduced form): (1) checks the compiled CPU kernels against the eager path, (2)
trains on the CPU only, (3) times the quantizer on the CPU and skips the hidden-4096 step, each
saying so. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402  (benchmarks/train_step.py, next to this file)


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        return t.contiguous().view(width)
    return t


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bits differ (any NaN equals any NaN: payloads are not part of the format)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return max(a.numel(), b.numel(), 1)
    diff = _bits(a) != _bits(b)
    if a.dtype.is_floating_point and a.dtype.itemsize > 1:
        diff &= ~(torch.isnan(a) & torch.isnan(b))
    return int(diff.sum())


def fixed_tensors(quick: bool) -> dict[str, torch.Tensor]:
    """The fixed inputs, built on the CPU from a seeded generator."""
    g = torch.Generator().manual_seed(1234)
    big = (64, 256) if quick else (1024, 2048)  # compiled kernels run at any size here (compile mode "1")
    ramp = torch.logspace(-3, 3, big[1])
    out = {
        "randn*logspace": torch.randn(*big, generator=g) * ramp,
        "odd 33x80": torch.randn(33, 80, generator=g),
        "3d 3x7x64": torch.randn(3, 7, 64, generator=g) * 10,
        "outlier channels": torch.randn(*big, generator=g) * torch.where(torch.arange(big[1]) % 97 == 0, 300.0, 1.0),
        "tiny 1e-30": torch.randn(64, 64, generator=g) * 1e-30,
    }
    if quick:  # the reduced form keeps one tensor of each kind of shape
        out = {k: out[k] for k in ("randn*logspace", "odd 33x80", "3d 3x7x64")}
    return {f"{k} {dt}".replace("torch.", ""): v.to(dt) for k, v in out.items()
            for dt in (torch.float32, torch.bfloat16, torch.float16)
            if not (dt == torch.float16 and k == "tiny 1e-30")}


def quantizer_cases(x: torch.Tensor, device: str):
    """(name, thunk) pairs: each thunk quantizes ``x`` moved to ``device`` and returns tensors."""
    import hf_nvfp4
    from hf_nvfp4.formats import get_format

    xd = x.to(device)
    gen = lambda: torch.Generator().manual_seed(99)  # noqa: E731  (CPU generator: same seeds everywhere)

    def q(t, **kw):
        r = hf_nvfp4.quantize_nvfp4(t, **kw)
        return [r.data, r.scale, r.amax]

    cases = [
        ("nvfp4 1x16", lambda: q(xd)),
        ("nvfp4 16x16", lambda: q(xd, tile=(16, 16))),
        ("nvfp4 fake", lambda: [hf_nvfp4.fake_quantize_nvfp4(xd)]),
        ("nvfp4 SR", lambda: q(xd, stochastic=True, generator=gen())),
        ("nvfp4 fake SR", lambda: [hf_nvfp4.fake_quantize_nvfp4(xd, stochastic=True, generator=gen())]),
        ("mxfp4 fake", lambda: [get_format("mxfp4").fake_quantize(xd)]),
        ("fp8_block fake", lambda: [get_format("fp8_block").fake_quantize(xd)]),
        ("fp8_tensor fake", lambda: [get_format("fp8_tensor").fake_quantize(xd)]),
    ]
    if x.ndim == 2 and x.shape[0] % 16 == 0:  # the Wgrad operands: transposed, blocks along the tokens
        xt = xd.t()
        cases += [
            ("hadamard x^T", lambda: [hf_nvfp4.hadamard_transform(xt)]),
            ("nvfp4 RHT x^T", lambda: q(xt, rht=True)),
            ("nvfp4 RHT SR x^T", lambda: q(xt, rht=True, stochastic=True, generator=gen())),
        ]
    return cases


def check_quantizers(device: str, quick: bool) -> bool:
    import hf_nvfp4

    print("\n[1] quantizers: bits on", "CUDA vs CPU" if device == "cuda" else "the CPU, compiled vs eager")
    if device != "cuda":
        print("    CUDA not available: skipping the CUDA-vs-CPU comparison; comparing the compiled CPU "
              "kernels with the eager path instead")
    bad = total = 0
    mode = hf_nvfp4.formats._compile.get_compile_mode()
    try:
        for name, x in fixed_tensors(quick).items():
            for case, _ in quantizer_cases(x, "cpu"):
                if device == "cuda":
                    hf_nvfp4.set_compile_mode("1")
                    ref = dict(quantizer_cases(x, "cpu"))[case]()
                    got = dict(quantizer_cases(x, "cuda"))[case]()
                else:
                    hf_nvfp4.set_compile_mode("0")
                    ref = dict(quantizer_cases(x, "cpu"))[case]()
                    hf_nvfp4.set_compile_mode("1")
                    got = dict(quantizer_cases(x, "cpu"))[case]()
                n = sum(mismatches(a, b) for a, b in zip(ref, got, strict=True))
                total += 1
                if n:
                    bad += 1
                    print(f"    MISMATCH {case:18s} on {name}: {n} elements differ")
    finally:
        hf_nvfp4.set_compile_mode(mode)
    print(f"    {total - bad}/{total} cases bit-identical")
    return bad == 0


def _tiny_llama(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    h = 64 if quick else 256
    cfg = LlamaConfig(hidden_size=h, intermediate_size=int(2.75 * h), num_hidden_layers=2,
                      num_attention_heads=max(1, h // 64), num_key_value_heads=max(1, h // 64),
                      vocab_size=512, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _losses(model, ids, device: str, steps: int) -> list[float]:
    import hf_nvfp4

    model = hf_nvfp4.convert_model(model.to(device),
                                   hf_nvfp4.NVFP4Config(bf16_last_blocks=0, disable_stochastic_rounding=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = ids.to(device)
    out = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out


def check_training(device: str, quick: bool) -> bool:
    steps = 3 if quick else 6
    print(f"\n[2] training: a small Llama, every block NVFP4, SR off, {steps} AdamW steps")
    base = _tiny_llama(quick)
    ids = torch.randint(0, 512, (2 if quick else 4, 64 if quick else 128), generator=torch.Generator().manual_seed(5))
    cpu = _losses(copy.deepcopy(base), ids, "cpu", steps)
    if device != "cuda":
        print("    CUDA not available: CPU losses only (nothing to compare):", " ".join(f"{v:.4f}" for v in cpu))
        ok = all(v == v for v in cpu) and cpu[-1] < cpu[0]
        print(f"    losses finite and falling: {ok}")
        return ok
    gpu = _losses(copy.deepcopy(base), ids, "cuda", steps)
    ok = True
    for i, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
        rel = abs(a - b) / abs(a)
        ok &= rel < 0.02
        print(f"    step {i}: cpu {a:.4f}  cuda {b:.4f}  rel diff {rel:.2e}")
    print(f"    losses agree to 2%: {ok}")
    return ok


def _median_time(fn, device: str, repeats: int) -> float:
    for _ in range(2):
        fn()
    ts = []
    for _ in range(repeats):
        train_step._sync(device)
        t = time.perf_counter()
        fn()
        train_step._sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def speed(device: str, quick: bool) -> dict:
    import hf_nvfp4

    n = 512 if quick else (8192 if device == "cuda" else 4096)
    print(f"\n[3] speed on {device}: quantizers on a {n}x{n} bf16 tensor (median of runs)")
    x = torch.randn(n, n, device=device).bfloat16()
    repeats = 5 if quick else 20
    copy_s = _median_time(lambda: x.clone(), device, repeats)
    gb = 2 * x.numel() * x.element_size() / 1e9
    print(f"    {'copy (bandwidth reference)':34s} {copy_s * 1e3:8.2f} ms {gb / copy_s:8.1f} GB/s")
    out = {"copy_gbps": gb / copy_s}
    gen = torch.Generator(device=device).manual_seed(0)
    for name, fn, written in (
        ("fake-quantize 1x16", lambda: hf_nvfp4.fake_quantize_nvfp4(x), 2),
        ("quantize 1x16 (packed)", lambda: hf_nvfp4.quantize_nvfp4(x), 0.5625),
        ("quantize 16x16 (weights)", lambda: hf_nvfp4.quantize_nvfp4(x, tile=(16, 16)), 0.5625),
        ("quantize SR", lambda: hf_nvfp4.quantize_nvfp4(x, stochastic=True, generator=gen), 0.5625),
        ("quantize RHT of x^T (Wgrad)", lambda: hf_nvfp4.quantize_nvfp4(x.t(), rht=True), 0.5625),
    ):
        t = _median_time(fn, device, repeats)
        moved = x.numel() * (x.element_size() + written) / 1e9
        out[name] = moved / t
        print(f"    {name:34s} {t * 1e3:8.2f} ms {moved / t:8.1f} GB/s  {moved / t / (gb / copy_s):6.1%} of copy")
    if device != "cuda" or quick:
        print("    hidden-4096 training step: skipped (" + ("--quick" if quick else "no CUDA") + "; on a CPU run "
              "benchmarks/train_step.py)")
        return out
    args = ["--hidden", "4096", "--intermediate", "11008", "--seq", "2048", "--batch", "2", "--vocab", "32000",
            "--repeats", "5", "--widths", "", "--dtype", "bf16"]
    print("\n    every-block training step at hidden 4096: python benchmarks/train_step.py " + " ".join(args))
    res = train_step.main(args)
    out["train_ratio_4096"] = res["train"]["NVFP4 every block (headline)"][1]
    out["inference_ratio_4096"] = res["inference"]["NVFP4 every block (headline)"][1]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced form: small tensors, few steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    dev = args.device
    print(f"torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name()}, CUDA {torch.version.cuda})" if dev == "cuda" else "")
          + (" [--quick: reduced form]" if args.quick else ""))
    ok_q = check_quantizers(dev, args.quick)
    ok_t = check_training(dev, args.quick)
    speed(dev, args.quick)
    print(f"\nquantizers bit-identical: {'PASS' if ok_q else 'FAIL'}; training matches: {'PASS' if ok_t else 'FAIL'}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0 if ok_q and ok_t else 1


if __name__ == "__main__":
    sys.exit(main())
