"""Training step and inference forward of a 2-block Llama: NVFP4 (emulated) vs unconverted.

    python benchmarks/train_step.py [--hidden 1024] [--intermediate 2816] [--seq 512] [--batch 2]
                                    [--repeats 7] [--widths 512,1024,2048] [--width-repeats 3]
                                    [--dtype both|auto|bf16|fp32] [--accumulate 4]

One default process (no allocator settings), the same model, weights and batch for every variant.
Variants are timed in interleaved rounds (one step of each per round), so a busy machine slows them
alike; each round gives a paired ratio to the unconverted model. Reported: the median time, the
median ratio and a 95% t-interval of the mean ratio.

- the machine: CPU model and flags (AVX-512, AVX512-BF16, AMX), bf16 and fp32 GEMM GFLOP/s;
- training step: forward + backward; after each timed step an (untimed) SGD step changes every
  weight, as in training, so nothing computed from the old weights can be reused (the weight
  cache re-quantizes every weight at every step here);
  variants: unconverted, the recipe's default (the last ~15% of blocks in BF16: with 2 blocks, the
  last one), and **every block in NVFP4** (the headline);
- gradient accumulation: ``--accumulate`` micro-batches (forward + backward each) per optimizer
  step, timed together: the weight cache quantizes each weight once per optimizer step;
- inference: forward under ``torch.no_grad()`` (evaluation, ``generate()``), unconverted vs every block;
- quantization time per step, measured directly: one every-block training step under
  torch.profiler, with every quantizer call (``Format.gemm_operand``/``pack`` and the kept tensors' ``operand``)
  and every GEMM of the converted Linears in a labelled range;
- width trend: the every-block training-step ratio at each of ``--widths`` (intermediate = 2.75 x
  hidden): the quantization is linear in the width, the GEMMs quadratic, so the ratio falls;
- memory: bytes of the tensors autograd saves for backward (activation memory), and on CUDA the
  peak allocated memory of one training step.

Compute dtype: ``--dtype both`` (the default) measures both regimes, bf16 autocast and fp32 (no
autocast), one after the other in the same process. ``auto`` picks one: bf16 wherever bf16 GEMMs
run at least half as fast as fp32 ones (every GPU, CPUs with AVX512-BF16 or AMX), else fp32: on a
CPU without bf16 GEMMs, bf16 matmul is 10-100x slower than fp32 and would hide any cost of the
emulation; there fp32 GEMMs play the role of fast GEMMs.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time

import torch

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
       11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 19: 2.09, 29: 2.05}


def t_interval(xs: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean of ``xs`` (n >= 2)."""
    n = len(xs)
    if n < 2:
        return xs[0], xs[0]
    mean, sd = statistics.fmean(xs), statistics.stdev(xs)
    t = T95.get(n - 1) or T95[max(k for k in T95 if k <= n - 1)]
    half = t * sd / math.sqrt(n)
    return mean - half, mean + half


def build(hidden: int, intermediate: int, seq: int, vocab: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_nvfp4

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      vocab_size=vocab, max_position_embeddings=seq)
    base = LlamaForCausalLM(cfg).to(device)
    every = hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config(bf16_last_blocks=0))
    return base, every


def _gflops(a: torch.Tensor, b: torch.Tensor, device: str) -> float:
    for _ in range(2):
        a @ b
    _sync(device)
    t = time.perf_counter()
    a @ b
    _sync(device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t) / 1e9


def gemm_speed(device: str, n: int = 1024) -> tuple[float, float]:
    """(bf16 GFLOP/s in the slowest of a Linear's three layouts, fp32 GFLOP/s), best of 3."""
    x, w = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    fp32 = max(_gflops(x, w, device) for _ in range(3))
    xb, wb = x.bfloat16(), w.bfloat16()
    # the layouts of a Linear's three GEMMs: x.W^T (fprop), dy.W (dgrad), dy^T.x (wgrad)
    bf16 = min(max(_gflops(a, b, device) for _ in range(3)) for a, b in ((xb, wb.t()), (xb, wb), (xb.t(), wb)))
    return bf16, fp32


def cpu_description() -> str:
    """The CPU's model name and the flags that decide the GEMM regime (Linux /proc/cpuinfo)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown CPU":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    want = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16")
    return f"{name}, {os.cpu_count()} logical CPUs; flags: " + " ".join(f"{k}={'yes' if k in flags else 'no'}"
                                                                      for k in want)


def choose_dtype(requested: str, speed: tuple[float, float]) -> tuple[torch.dtype, str]:
    """(compute dtype, why): bf16 unless it is 'auto' and bf16 GEMMs are far slower than fp32 here."""
    bf16, fp32 = speed
    why = f"bf16 GEMM {bf16:.0f} GFLOP/s (slowest layout) vs fp32 {fp32:.0f} GFLOP/s"
    if requested != "auto":
        return (torch.bfloat16 if requested == "bf16" else torch.float32), f"--dtype {requested}; {why}"
    if bf16 >= 0.5 * fp32:
        return torch.bfloat16, why + ": bf16 autocast"
    return torch.float32, why + ": no fast bf16 GEMMs here, so fp32 (no autocast)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Trainer:
    """One timed forward+backward, then an untimed SGD step (the weights change as in training)."""

    def __init__(self, model, ids, device, dtype=torch.bfloat16):
        self.model, self.ids, self.device, self.dtype = model, ids, device, dtype
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-6)

    def step(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        _sync(self.device)
        dt = time.perf_counter() - t
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return dt


class Accumulate(Trainer):
    """``micro`` forward+backward passes with the same weights (timed together), then the SGD step."""

    def __init__(self, model, ids, device, dtype=torch.bfloat16, micro: int = 4):
        super().__init__(model, ids, device, dtype)
        self.micro = micro

    def step(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        for _ in range(self.micro):
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
                loss = self.model(input_ids=self.ids, labels=self.ids).loss / self.micro
            loss.backward()
        _sync(self.device)
        dt = time.perf_counter() - t
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return dt


def quantization_profile(model, ids, device, dtype, base=None) -> dict[str, float]:
    """ms of one every-block training step spent quantizing and in the converted Linears' GEMMs,
    from torch.profiler ranges around every quantizer call and GEMM (outermost calls only)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from hf_nvfp4.formats import registry
    from hf_nvfp4.formats.nvfp4 import NVFP4Tensor
    from hf_nvfp4.formats.quantized import GemmOperand
    from hf_nvfp4.ops import linear as ops_linear

    depth = [0]

    def labelled(fn, label):
        def run(*a, **k):
            if depth[0]:
                return fn(*a, **k)
            depth[0] += 1
            try:
                with record_function(label):
                    return fn(*a, **k)
            finally:
                depth[0] -= 1
        return run

    # the quantizers, the GEMM operands made from kept (packed) tensors, and the converted GEMMs
    patched = [(registry.Format, n, getattr(registry.Format, n)) for n in ("gemm_operand", "pack")]
    patched += [(cls, "operand", cls.operand) for cls in (NVFP4Tensor, GemmOperand)]  # what pack() keeps
    patched.append((ops_linear, "_mm", ops_linear._mm))
    for owner, name, fn in patched:
        setattr(owner, name, labelled(fn, "hf_nvfp4.gemm" if name == "_mm" else "hf_nvfp4.quantize"))
    try:
        runner = Trainer(model, ids, device, dtype)
        runner.step()  # warm
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=acts) as prof:
            wall = runner.step()
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
    out = {"step_ms": wall * 1e3}
    if base is not None:  # the unconverted step right after, under the profiler too (same conditions)
        b = Trainer(base, ids, device, dtype)
        b.step()
        with profile(activities=acts):
            out["unconverted_step_ms"] = b.step() * 1e3
    for ev in prof.key_averages():
        if ev.key in ("hf_nvfp4.quantize", "hf_nvfp4.gemm"):
            out[ev.key.split(".")[1] + "_ms"] = ev.cpu_time_total / 1e3  # per step: one step profiled
    return out


class Inference:
    def __init__(self, model, ids, device, dtype=torch.bfloat16):
        self.model, self.ids, self.device, self.dtype = model, ids, device, dtype

    def step(self) -> float:
        _sync(self.device)
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            self.model(input_ids=self.ids)
        _sync(self.device)
        return time.perf_counter() - t


def interleaved(runners: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each runner, one step of each per round."""
    for r in runners.values():
        for _ in range(warmup):
            r.step()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():
            times[k].append(r.step())
    return times


def report(title: str, times: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """Print median times and paired ratios to the first entry; returns {name: (median s, median ratio)}."""
    names = list(times)
    base = times[names[0]]
    print(f"\n{title}")
    print(f"{'variant':40s} {'median':>10s} {'ratio':>7s} {'95% CI of mean ratio':>22s} {'min-max ratio':>15s}")
    out = {}
    for k in names:
        ratios = [a / b for a, b in zip(times[k], base, strict=True)]
        lo, hi = t_interval(ratios)
        med = statistics.median(times[k])
        out[k] = (med, statistics.median(ratios))
        print(f"{k:40s} {med * 1e3:8.1f}ms {out[k][1]:6.2f}x {f'[{lo:.2f}, {hi:.2f}]':>22s} "
              f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>15s}")
    return out


def saved_bytes(model, ids, device, dtype=torch.bfloat16) -> int:
    """Bytes of the non-parameter tensors autograd saves for one backward (activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    ac = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ac:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def peak_mib(model, ids, device, dtype=torch.bfloat16) -> float:
    if device != "cuda":
        return float("nan")
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    Trainer(model, ids, device, dtype).step()
    return torch.cuda.max_memory_allocated() / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step (0: skip)")
    ap.add_argument("--widths", default="512,1024,2048",
                    help="hidden sizes of the width trend, in the first regime measured ('' to skip)")
    ap.add_argument("--width-repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("both", "auto", "bf16", "fp32"), default="both")
    ap.add_argument("--width-only", action="store_true", help="only the width trend")
    args = ap.parse_args(argv)

    import hf_nvfp4

    dev = args.device
    print("command: python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"device={dev} threads={torch.get_num_threads()} torch={torch.__version__} hidden={args.hidden} "
          f"intermediate={args.intermediate} seq={args.seq} batch={args.batch} vocab={args.vocab} "
          f"repeats={args.repeats} load average at start={_load()}")
    print(f"gpu={torch.cuda.get_device_name()}" if dev == "cuda" else f"cpu: {cpu_description()}")
    speed = gemm_speed(dev)
    print(f"GEMM speed (1024^3): bf16 {speed[0]:.0f} GFLOP/s (slowest of a Linear's three layouts), "
          f"fp32 {speed[1]:.0f} GFLOP/s")
    if args.dtype == "both":
        regimes = [(torch.bfloat16, "bf16 autocast"), (torch.float32, "fp32, no autocast")]
    else:
        regimes = [choose_dtype(args.dtype, speed)]
    results: dict = {"gemm_gflops": {"bf16": speed[0], "fp32": speed[1]}}

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=dev)
    for dtype, why in regimes if not args.width_only else []:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        res = results[name] = {}
        print(f"\n===== regime: {dtype} ({why}); load average {_load()} =====")
        base, every = build(args.hidden, args.intermediate, args.seq, args.vocab, dev)
        default = hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config())
        models = {"unconverted": base, "NVFP4 recipe (default BF16 blocks)": default,
                  "NVFP4 every block (headline)": every}
        train = interleaved({k: Trainer(m, ids, dev, dtype) for k, m in models.items()}, args.repeats)
        res["train"] = report(f"[{name}] Training step (forward + backward), load {_load()}", train)
        if args.accumulate > 1:
            acc = interleaved({k: Accumulate(models[k], ids, dev, dtype, args.accumulate)
                               for k in ("unconverted", "NVFP4 every block (headline)")}, max(3, args.repeats // 2))
            res["accumulate"] = report(f"[{name}] {args.accumulate} micro-batches (forward + backward each) per "
                                       f"optimizer step, load {_load()}", acc)
        infer = interleaved({k: Inference(models[k], ids, dev, dtype)
                             for k in ("unconverted", "NVFP4 every block (headline)")}, args.repeats)
        res["inference"] = report(f"[{name}] Inference forward under torch.no_grad(), load {_load()}", infer)
        prof = quantization_profile(every, ids, dev, dtype, base)
        res["profile"] = prof
        print(f"\n[{name}] one every-block training step under torch.profiler: {prof['step_ms']:.0f} ms; "
              f"quantization {prof.get('quantize_ms', 0):.0f} ms "
              f"({prof.get('quantize_ms', 0) / prof['step_ms']:.0%}), converted GEMMs {prof.get('gemm_ms', 0):.0f} ms; "
              f"the unconverted step right after it: {prof['unconverted_step_ms']:.0f} ms; load {_load()}")
        print(f"\n{'memory':40s} {'saved for backward':>20s} {'ratio':>7s} {'peak (CUDA)':>12s}")
        mem0 = None
        for k, m in models.items():
            mem = saved_bytes(m, ids, dev, dtype) / 2**20
            mem0 = mem0 or mem
            peak = peak_mib(m, ids, dev, dtype)
            peak_s = "n/a (CPU)" if peak != peak else f"{peak:.1f}MiB"
            print(f"{k:40s} {mem:17.1f}MiB {mem / mem0:6.2f}x {peak_s:>12s}")
        del base, every, default, models
        if len(regimes) == 1:  # one regime: its figures at the top level too (gpu_check reads them)
            results.update(res)

    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if widths:
        dtype = regimes[0][0]
        results["width"] = {}
        print(f"\nWidth trend ({dtype}): every block NVFP4 / unconverted, training step, {args.width_repeats} rounds "
              f"each (intermediate = 2.75 x hidden), load {_load()}")
        cols = ("unconverted", "every block")
        print(f"{'hidden':>7s} {'intermediate':>13s} {cols[0]:>12s} {cols[1]:>12s} {'ratio':>7s} {'95% CI':>16s}")
        for h in widths:
            inter = int(round(2.75 * h / 16)) * 16
            b, e = build(h, inter, args.seq, args.vocab, dev)
            t = interleaved({"u": Trainer(b, ids, dev, dtype), "e": Trainer(e, ids, dev, dtype)}, args.width_repeats,
                            warmup=1)
            ratios = [a / c for a, c in zip(t["e"], t["u"], strict=True)]
            lo, hi = t_interval(ratios)
            med_r = statistics.median(ratios)
            results["width"][h] = med_r
            print(f"{h:7d} {inter:13d} {statistics.median(t['u']) * 1e3:10.1f}ms "
                  f"{statistics.median(t['e']) * 1e3:10.1f}ms {med_r:6.2f}x {f'[{lo:.2f}, {hi:.2f}]':>16s}")
            del b, e
    from hf_nvfp4.formats._compile import fallbacks

    print(f"\nkernels that fell back to eager: {fallbacks() or 'none'}")
    print(f"load average at end={_load()}")
    return results


def _load() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"{load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"


if __name__ == "__main__":
    main()
