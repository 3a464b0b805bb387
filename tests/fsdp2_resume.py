"""torchrun --nproc_per_node N tests/fsdp2_resume.py MODE DIR: save_state/load_state of NVFP4Plugin under FSDP2.

As tests/fsdp2_plugin.py, on the CPU with 2 gloo processes, the Accelerator's state is forced to FSDP
with an FSDP2 plugin (SHARDED_STATE_DICT: accelerate's distributed checkpoint, torch.distributed.checkpoint)
so that prepare, save_state and load_state take accelerate's FSDP2 paths (also on one process,
started with torchrun's environment, for MODE "resume-fsdp").

MODE "run": 6 steps, save_state after step 3, then (fresh Accelerator, model, optimizer, scheduler and
plugin, as in a new process) load_state and steps 4-6 again; writes DIR/run.json (losses, metrics and
the sha256 of every weight of both runs). MODE "resume-fsdp" (FSDP2 forced whatever the world size)
or "resume" (no FSDP): load DIR/ckpt (written by "run", maybe on another world size) and run steps
4-6; writes DIR/MODE_N.json (N: the world size), with the error load_state raised if it did.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from models import tiny

import hf_nvfp4

STEPS, SAVE_AT = 6, 3


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(100 + step))


def fsdp2(acc: Accelerator, force: bool) -> None:
    """Force accelerate's FSDP2 paths on the CPU (accelerate enables FSDP only for GPU launches)."""
    if force:
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="SHARDED_STATE_DICT",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
        )
        acc.state.distributed_type = DistributedType.FSDP
        # AcceleratorState() (which the prepared optimizer and scheduler build) copies PartialState's
        # shared fields, so the type must be FSDP there too, or save_state takes the non-FSDP path
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def setup(fsdp: bool):
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    fsdp2(acc, fsdp)
    torch.manual_seed(0)
    model = tiny("llama", 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    plugin = hf_nvfp4.NVFP4Plugin(hf_nvfp4.NVFP4Config(bf16_last_blocks=1), switch_at=0.5, max_steps=STEPS,
                                  switch_scope="forward", fp8_shadow=True)
    model, opt, sched = plugin.prepare(acc, model, opt, sched)
    return acc, plugin, model, opt, sched


def train(acc, plugin, model, opt, sched, until: int, save: Path | None = None):
    losses, logs = [], []
    world, rank = acc.num_processes, acc.process_index
    while plugin.completed_steps < until:
        ids = batch(plugin.completed_steps).chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        logs.append(plugin.step(batch={"input_ids": ids, "labels": ids}, loss=loss))
        losses.append(acc.reduce(loss.detach(), "mean").item())
        if save is not None and plugin.completed_steps == SAVE_AT:
            acc.save_state(str(save))
    return losses, logs


def digest(state: dict) -> dict:
    """A sha256 of every tensor's bytes: equal digests are equal tensors, bit for bit."""
    return {k: hashlib.sha256(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def summary(acc, plugin, model) -> dict:
    full = acc.get_state_dict(model)  # the whole weights, gathered from the shards under FSDP2
    return {"weights": digest(full), "shadow": digest(plugin.shadow.model.state_dict()),
            "weight_sum": float(sum(v.double().sum() for v in full.values())),
            "param_type": type(next(model.parameters())).__name__, "world": acc.num_processes,
            "steps": plugin.completed_steps}


def main(mode: str, out: Path) -> None:
    result: dict = {}
    fsdp = mode == "resume-fsdp" or (mode == "run" and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    if mode == "run":
        acc, plugin, model, opt, sched = setup(fsdp)
        losses, logs = train(acc, plugin, model, opt, sched, STEPS, save=out / "ckpt")
        result["full"] = {"losses": losses, "logs": logs, **summary(acc, plugin, model)}
        del acc, plugin, model, opt, sched
    acc, plugin, model, opt, sched = setup(fsdp)
    try:
        acc.load_state(str(out / "ckpt"))
    except Exception as e:  # noqa: BLE001 - the test reads the message
        result["error"] = f"{type(e).__name__}: {e}"
    else:
        losses, logs = train(acc, plugin, model, opt, sched, STEPS)
        result["resumed"] = {"losses": losses, "logs": logs, **summary(acc, plugin, model)}
    if acc.is_main_process:
        name = "run.json" if mode == "run" else f"{mode}_{acc.num_processes}.json"
        (out / name).write_text(json.dumps(result))
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
