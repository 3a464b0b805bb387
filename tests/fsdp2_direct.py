"""torchrun --nproc_per_node 2 tests/fsdp2_direct.py OUT.json  (or plain python for one process).

Trains a tiny converted Llama with torch's FSDP2 (fully_shard) over gloo on the CPU, each
process taking half of the same global batch, and writes the losses.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from models import tiny

import hf_nvfp4

if __name__ == "__main__":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = hf_nvfp4.convert_model(
        tiny("llama", 2), hf_nvfp4.NVFP4Config(bf16_last_blocks=0, disable_stochastic_rounding=True)
    )
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    losses, ptype = [], type(next(model.parameters())).__name__
    for _ in range(5):
        ids = torch.randint(0, 256, (8, 32), generator=g)
        local = ids.chunk(world)[rank]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=local, labels=local).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(total.item())
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"losses": losses, "param_type": ptype, "world": world}, f)
    if world > 1:
        dist.destroy_process_group()
