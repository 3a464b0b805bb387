"""The tiny-cpu training step (small tensors): NVFP4 as the recipe ships vs unconverted.

    python benchmarks/tiny_step.py [--compile auto|1|0] [--repeats 5]

The tiny-cpu recipe's model (Llama, hidden 128, intermediate 384, 4 blocks, the last in BF16),
batch 8 x 256 tokens, bf16 autocast, an SGD update after every step (the weights change, as in
training). Paired rounds in one default process after 2 warm-ups; prints the median step times,
their ratio, and the profiler's event count of one converted step (the per-call cost that
dominates at these sizes).
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import time

import torch


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", default="auto", choices=("auto", "1", "0"))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, LlamaConfig

    import hf_nvfp4

    hf_nvfp4.set_compile_mode(args.compile)
    print(f"load average at start={os.getloadavg()[0]:.2f} threads={torch.get_num_threads()} compile={args.compile}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    base = AutoModelForCausalLM.from_config(cfg)
    conv = hf_nvfp4.convert_model(copy.deepcopy(base), hf_nvfp4.NVFP4Config(bf16_last_blocks=1))
    ids = torch.randint(0, 256, (8, 256))

    def step(m) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        dt = time.perf_counter() - t
        with torch.no_grad():
            for p in m.parameters():
                p.add_(p.grad, alpha=-1e-3)
                p.grad = None
        return dt

    print(f"first converted step (compiles, or loads the on-disk cache): {step(conv):.1f} s")
    for _ in range(2):
        step(conv), step(base)
    tb, tc = [], []
    for _ in range(args.repeats):
        tb.append(step(base))
        tc.append(step(conv))
    ratio = sorted(c / b for c, b in zip(tc, tb, strict=True))[len(tc) // 2]
    print(f"unconverted {sorted(tb)[len(tb) // 2] * 1e3:.0f} ms, NVFP4 {sorted(tc)[len(tc) // 2] * 1e3:.0f} ms, "
          f"median paired ratio {ratio:.2f}x (target <= 1.6x)")
    with torch.profiler.profile() as prof:
        step(conv)
    c = collections.Counter(e.name for e in prof.events())
    print(f"profiler events in one converted step: {sum(c.values())}; top: {c.most_common(5)}")
    print(f"load average at end={os.getloadavg()[0]:.2f}")
    return ratio


if __name__ == "__main__":
    main()
