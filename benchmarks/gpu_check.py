"""GPU check: the emulator's bits on CUDA equal the CPU's, training matches, speed, and TE vs emulation.

    python benchmarks/gpu_check.py            # one command on one H100/H200, no TE needed: under 8 minutes
    python benchmarks/gpu_check.py --quick    # the reduced CPU form (what tests/test_gpu_check.py runs)

It ends with a verdict table (check, figure, PASS / FAIL / SKIP); exit status 1 if a check fails.

1. Quantizer bits, CUDA vs CPU, for every format, tile, RHT and stochastic rounding: a fixed set of
   tensors (odd and 3D shapes, fp32/bf16/fp16, tiny values) quantized on the GPU and on the CPU.
   Stochastic rounding draws its seeds from a generator on the GPU (no host copy); the CPU
   reference replays the seeds the GPU drew, so the uniform stream (integer hash) must agree.
   The Hadamard transform has a fixed summation order (docs/numerics.md), so it is compared too.
2. Training: a small Llama, the same weights, batch and seed, a few AdamW steps with every block in
   NVFP4 (stochastic rounding off, so only GEMM accumulation order differs) on CUDA and on the
   CPU: the losses must agree to 2% at every step.
3. Speed: quantizer GB/s (bytes read + written) against a device-to-device copy of the same tensor
   (the bandwidth this device reaches), and the every-block training-step and no-grad forward
   ratios vs BF16 of a 2-block Llama at hidden 4096 (benchmarks/train_step.py's method).
4. Where Transformer Engine with NVFP4 support is present (Blackwell): per GEMM (Fprop, Dgrad,
   Wgrad) of one Linear, TE vs the emulation, without SR, at TE's own tolerance (relative error
   2e-2, tests/pytorch/nvfp4/test_nvfp4_module_exact.py); skipped, and said so, elsewhere.

Without CUDA (reduced form): (1) checks the compiled CPU kernels against the eager path, (2)
trains on the CPU only, (3) times the quantizer on the CPU and skips the hidden-4096 step, (4) is
skipped, each saying so.
"""

from __future__ import annotations

import argparse
import contextlib
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
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    if quick:  # the reduced form: a 2D and a 3D tensor, fp32 and bf16
        out = {k: out[k] for k in ("randn*logspace", "3d 3x7x64")}
        dtypes = dtypes[:2]
    return {f"{k} {dt}".replace("torch.", ""): v.to(dt) for k, v in out.items() for dt in dtypes
            if not (dt == torch.float16 and k == "tiny 1e-30")}


class SeedTape:
    """Stochastic rounding's seeds: recorded where the device generator drew them, replayed on the CPU.

    The seeds are two integers drawn from a torch.Generator on the operand's device; everything after
    them (the counter hash, the rounding) must give the same bits on every device.
    """

    def __init__(self) -> None:
        self.seeds: list[torch.Tensor] = []

    @contextlib.contextmanager
    def record(self):
        from hf_nvfp4.formats import _random

        real = _random.draw_seeds

        def draw(generator, device):
            out = real(generator, device)
            self.seeds.append(out.cpu())
            return out

        _random.draw_seeds = draw
        try:
            yield
        finally:
            _random.draw_seeds = real

    @contextlib.contextmanager
    def replay(self):
        from hf_nvfp4.formats import _random

        real = _random.draw_seeds
        _random.draw_seeds = lambda generator, device: self.seeds.pop(0).to(device)
        try:
            yield
        finally:
            _random.draw_seeds = real


def quantizer_cases(x: torch.Tensor, device: str):
    """(name, thunk) pairs: each thunk quantizes ``x`` moved to ``device`` and returns tensors.

    Every format, tile, RHT and stochastic rounding; SR draws from a generator on ``device``.
    """
    import hf_nvfp4
    from hf_nvfp4.formats import get_format

    xd = x.to(device)
    gen = lambda: torch.Generator(device=device).manual_seed(99)  # noqa: E731  (on the operand's device)

    def q(t, **kw):
        r = hf_nvfp4.quantize_nvfp4(t, **kw)
        return [r.data, r.scale, r.amax]

    def fake(fmt, t=None, **kw):
        return lambda: [get_format(fmt).fake_quantize(xd if t is None else t, **kw)]

    cases = [
        ("nvfp4 1x16", lambda: q(xd)),
        ("nvfp4 16x16", lambda: q(xd, tile=(16, 16))),
        ("nvfp4 fake", lambda: [hf_nvfp4.fake_quantize_nvfp4(xd)]),
        ("nvfp4 SR", lambda: q(xd, stochastic=True, generator=gen())),
        ("nvfp4 fake SR", lambda: [hf_nvfp4.fake_quantize_nvfp4(xd, stochastic=True, generator=gen())]),
        ("mxfp4 1x32", fake("mxfp4")),
        ("mxfp4 SR", lambda: [get_format("mxfp4").fake_quantize(xd, stochastic=True, generator=gen())]),
        ("mxfp8 1x32", fake("mxfp8")),
        ("fp8_block 1x128", fake("fp8_block")),
        ("fp8_tensor", fake("fp8_tensor")),
    ]
    if x.ndim == 2 and x.shape[0] % 16 == 0:  # the Wgrad operands: transposed, blocks along the tokens
        xt = xd.t()
        cases += [
            ("hadamard x^T", lambda: [hf_nvfp4.hadamard_transform(xt)]),
            ("nvfp4 RHT x^T", lambda: q(xt, rht=True)),
            ("nvfp4 RHT SR x^T", lambda: q(xt, rht=True, stochastic=True, generator=gen())),
            ("mxfp4 RHT x^T", fake("mxfp4", xt, rht=True)),
        ]
    if x.ndim == 2 and x.shape[0] % 32 == 0 and x.shape[1] % 32 == 0:
        cases += [("mxfp4 32x32", fake("mxfp4", tile=(32, 32)))]
    if x.ndim == 2 and x.shape[0] % 128 == 0 and x.shape[1] % 128 == 0:
        cases += [("fp8_block 128x128", fake("fp8_block", tile=(128, 128)))]
    return cases


def check_quantizers(device: str, quick: bool) -> tuple[bool, str]:
    import hf_nvfp4

    print("\n[1] quantizers: bits on", "CUDA vs CPU" if device == "cuda" else "the CPU, compiled vs eager")
    if device != "cuda":
        print("    CUDA not available: skipping the CUDA-vs-CPU comparison; comparing the compiled CPU "
              "kernels with the eager path instead")
    bad = total = 0
    mode = hf_nvfp4.formats._compile.get_compile_mode()
    # every kernel meets many shapes and dtypes here: let it recompile rather than fall back to eager
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 64)
    try:
        for name, x in fixed_tensors(quick).items():
            for case, _ in quantizer_cases(x, "cpu"):
                tape = SeedTape()
                hf_nvfp4.set_compile_mode("1")
                with tape.record():
                    got = dict(quantizer_cases(x, device))[case]()
                if device != "cuda":
                    hf_nvfp4.set_compile_mode("0")
                with tape.replay():
                    ref = dict(quantizer_cases(x, "cpu"))[case]()
                n = sum(mismatches(a, b) for a, b in zip(ref, got, strict=True))
                total += 1
                if n:
                    bad += 1
                    print(f"    MISMATCH {case:18s} on {name}: {n} elements differ")
    finally:
        hf_nvfp4.set_compile_mode(mode)
        torch._dynamo.config.recompile_limit = limit
    print(f"    {total - bad}/{total} cases bit-identical")
    return bad == 0, f"{total - bad}/{total} cases bit-identical"


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


def check_training(device: str, quick: bool) -> tuple[bool | None, str]:
    steps = 3 if quick else 6
    print(f"\n[2] training: a small Llama, every block NVFP4, SR off, {steps} AdamW steps")
    base = _tiny_llama(quick)
    ids = torch.randint(0, 512, (2 if quick else 4, 64 if quick else 128), generator=torch.Generator().manual_seed(5))
    cpu = _losses(copy.deepcopy(base), ids, "cpu", steps)
    if device != "cuda":
        print("    CUDA not available: CPU losses only (nothing to compare):", " ".join(f"{v:.4f}" for v in cpu))
        ok = all(v == v for v in cpu) and cpu[-1] < cpu[0]
        print(f"    losses finite and falling: {ok}")
        return (None if ok else False), "CPU only: " + " ".join(f"{v:.3f}" for v in cpu)
    gpu = _losses(copy.deepcopy(base), ids, "cuda", steps)
    ok, worst = True, 0.0
    for i, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
        rel = abs(a - b) / abs(a)
        worst = max(worst, rel)
        ok &= rel < 0.02
        print(f"    step {i}: cpu {a:.4f}  cuda {b:.4f}  rel diff {rel:.2e}")
    print(f"    losses agree to 2%: {ok}")
    return ok, f"worst step rel diff {worst:.2e} (limit 2e-2)"


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


def check_te(device: str) -> tuple[bool | None, str]:
    """Per GEMM, TE vs the emulation on one Linear (no SR): y (Fprop), dx (Dgrad), dW (Wgrad)."""
    print("\n[4] Transformer Engine vs the emulation, per GEMM")
    if device != "cuda":
        print("    skipped: no CUDA")
        return None, "skipped: no CUDA"
    import torch.nn as nn

    import hf_nvfp4
    from hf_nvfp4.nn.te_backend import te_status

    usable, why = te_status("nvfp4", stochastic=False)
    if not usable:
        print(f"    skipped: {why}")
        return None, f"skipped: {why}"
    ok, worst = True, {}
    for rht in (False, True):
        cfg = dict(disable_rht=not rht, disable_stochastic_rounding=True, bf16_last_blocks=0)
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(1024, 2048, bias=False)).to(device)
        te_m = hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config(backend="te", **cfg))
        em_m = hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config(backend="emulated", **cfg))
        x = torch.randn(4, 256, 1024, device=device)
        g = torch.randn(4, 256, 2048, device=device).bfloat16()
        outs = []
        for m in (te_m, em_m):
            xx = x.clone().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(xx)
            y.backward(g)
            outs.append((y.detach(), xx.grad, m[0].weight.grad))
        for gemm, a, b in zip(("Fprop", "Dgrad", "Wgrad"), *outs, strict=True):
            rel = ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()
            worst[f"{gemm}{' RHT' if rht else ''}"] = rel
            ok &= rel <= 2e-2
            print(f"    {gemm:6s} rht={rht!s:5s} relative error {rel:.2e} (TE's tolerance 2e-2)")
    return ok, "worst " + max(worst, key=worst.get) + f" {max(worst.values()):.2e} (limit 2e-2)"


def verdict(rows: list[tuple[str, bool | None, str]]) -> None:
    print("\nVERDICT")
    w = max(len(r[0]) for r in rows)
    for name, ok, figure in rows:
        mark = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  {name:{w}s}  {mark:4s}  {figure}")


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
    ok_q, fig_q = check_quantizers(dev, args.quick)
    ok_t, fig_t = check_training(dev, args.quick)
    sp = speed(dev, args.quick)
    ok_te, fig_te = check_te(dev)
    worst_q = min((v for k, v in sp.items() if k != "copy_gbps" and not k.endswith("4096")), default=float("nan"))
    rows = [
        ("quantizer bits " + ("CUDA vs CPU" if dev == "cuda" else "compiled vs eager (CPU)"), ok_q, fig_q),
        ("training loss " + ("CUDA vs CPU" if dev == "cuda" else "(CPU only)"), ok_t, fig_t),
        ("quantizer bandwidth vs copy", None,
         f"slowest quantizer {worst_q:.3g} GB/s, copy {sp['copy_gbps']:.3g} GB/s ({worst_q / sp['copy_gbps']:.0%})"),
        ("step overhead vs BF16, hidden 4096", None,
         f"train x{sp['train_ratio_4096']:.2f}, no-grad forward x{sp['inference_ratio_4096']:.2f}"
         if "train_ratio_4096" in sp else "skipped (" + ("--quick" if args.quick else "no CUDA") + ")"),
        ("TE vs emulation per GEMM", ok_te, fig_te),
    ]
    verdict(rows)
    ok = ok_q and ok_t is not False and ok_te is not False
    print(f"\nquantizers bit-identical: {'PASS' if ok_q else 'FAIL'}; training matches: "
          f"{'PASS' if ok_t else ('SKIP' if ok_t is None else 'FAIL')}; {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
