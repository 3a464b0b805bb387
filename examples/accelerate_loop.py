"""Pretrain a tiny Llama with NVFP4 in your own Accelerate loop (hf_nvfp4.NVFP4Plugin).

Data: Python's own standard-library sources, byte-level (ByT5's tokenizer): fully offline.

python examples/accelerate_loop.py
accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml examples/accelerate_loop.py
python examples/accelerate_loop.py --save-every 10                       # save_state every 10 steps
python examples/accelerate_loop.py --resume runs/accelerate-loop/step-10  # continue bit-identically
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

import hf_nvfp4
from hf_nvfp4.data import stdlib_files


def stdlib_blocks(seq_len: int, max_files: int) -> tuple[list[dict], int]:
    """Packed ``seq_len``-token blocks of the stdlib sources, and the vocabulary size."""
    tok = ByT5Tokenizer()
    ids: list[int] = []
    for path in stdlib_files(max_files):
        ids += tok(Path(path).read_text(encoding="utf-8", errors="replace"))["input_ids"]
    n = len(ids) // seq_len
    blocks = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    return [{"input_ids": b, "labels": b} for b in blocks], int(math.ceil(len(tok) / 16) * 16)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-files", type=int, default=40)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switch-at", type=float, default=0.82, help="late switch to BF16 (fraction); 0 = none")
    p.add_argument("--switch-scope", default="forward", choices=["all", "forward", "backward"])
    p.add_argument("--fp8-shadow", action="store_true", help="lockstep FP8 shadow: logs the loss gap")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="a directory written by --save-every")
    p.add_argument("--output-dir", default="runs/accelerate-loop")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--report-to", default=None, help="an Accelerate tracker, e.g. tensorboard")
    p.add_argument("--losses-json", default=None, help="write the per-step loss (mean over processes)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # else a launch on a machine without GPUs runs N lone processes
        mixed_precision="bf16",
        gradient_accumulation_steps=args.grad_accum,
        log_with=args.report_to,
        project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),  # epochs reshuffle reproducibly
    )
    set_seed(args.seed)
    data, vocab = stdlib_blocks(args.seq_len, args.max_files)
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)

    plugin = hf_nvfp4.NVFP4Plugin(
        hf_nvfp4.NVFP4Config(bf16_last_blocks=1),
        switch_at=args.switch_at or None,
        switch_scope=args.switch_scope,
        max_steps=args.max_steps,
        fp8_shadow=args.fp8_shadow,
        shadow_max_grad_norm=1.0,
    )
    model, optimizer, loader, scheduler = plugin.prepare(accelerator, model, optimizer, loader, scheduler)
    accelerator.init_trackers("accelerate-loop", config={k: v for k, v in vars(args).items() if v is not None})
    if args.resume:
        accelerator.load_state(args.resume)  # weights, optimizer, scheduler, RNG and the plugin
    accelerator.print(f"NVFP4: {sum(isinstance(m, hf_nvfp4.NVFP4Linear) for m in model.modules())} Linear layers "
                      f"converted; {len(data)} blocks of {args.seq_len} tokens; from step {plugin.completed_steps}")

    losses: list[tuple[int, float]] = []
    micro = plugin.completed_steps * args.grad_accum  # micro-batches consumed so far
    epoch, skip = divmod(micro, len(loader))
    model.train()
    while plugin.completed_steps < args.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip, step_loss = 0, 0.0
        for batch in batches:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                metrics = plugin.step(batch=batch, loss=loss)  # counts a step when gradients sync
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / args.grad_accum
            if not accelerator.sync_gradients:
                continue
            step = plugin.completed_steps
            losses.append((step, step_loss))
            accelerator.log({"loss": step_loss, **metrics}, step=step)
            if step % args.log_every == 0 or metrics:
                extra = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
                accelerator.print(f"step {step}: loss {step_loss:.4f} {extra}")
            step_loss = 0.0
            if args.save_every and step % args.save_every == 0:
                accelerator.save_state(str(out / f"step-{step}"))
            if step >= args.max_steps:
                break
        epoch += 1

    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(  # a plain HF checkpoint, the recipe in config.json
        out, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    summary = {"losses": losses, "world_size": accelerator.num_processes,
               "param_type": type(next(model.parameters())).__name__}
    if args.losses_json and accelerator.is_main_process:
        Path(args.losses_json).write_text(json.dumps(summary))
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
