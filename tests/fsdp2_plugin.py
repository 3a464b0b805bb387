"""python tests/fsdp2_plugin.py OUT.json, or torchrun --nproc_per_node 2 tests/fsdp2_plugin.py OUT.json.

NVFP4Plugin through Accelerate's own FSDP2 preparation, on the CPU. accelerate 1.15 turns FSDP on
only for GPU launches (a CPU state never becomes FSDP), so with 2 processes this script sets the
state's distributed type to FSDP with an FSDP2 plugin after the Accelerator is built; prepare()
then runs accelerate's fsdp2_prepare_model (fully_shard per decoder layer, DTensor parameters)
over gloo (accelerate's prepare itself sets the state back to MULTI_CPU afterwards; backward and
the optimizer step are the same calls under FSDP2). Each process takes half of the same global
batch; writes the mean losses.
"""

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from models import tiny

import hf_nvfp4

if __name__ == "__main__":
    acc = Accelerator(cpu=True, mixed_precision="bf16")  # under torchrun: 2 CPU processes over gloo
    world, rank = acc.num_processes, acc.process_index
    fsdp2 = world > 1
    if fsdp2:
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
        )
        acc.state.distributed_type = DistributedType.FSDP
    torch.manual_seed(0)
    model = tiny("llama", 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    plugin = hf_nvfp4.NVFP4Plugin(hf_nvfp4.NVFP4Config(bf16_last_blocks=1), switch_at=3, fp8_shadow=True)
    model, opt = plugin.prepare(acc, model, opt)
    from torch.distributed.fsdp import FSDPModule

    sharded = sum(isinstance(m, FSDPModule) for m in model.modules())  # modules fully_shard wrapped
    g = torch.Generator().manual_seed(1)
    losses, switches, shadow = [], [], []
    for _ in range(5):
        ids = torch.randint(0, 256, (8, 32), generator=g)
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        metrics = plugin.step(batch={"input_ids": local, "labels": local}, loss=loss)
        if "precision_switch_step" in metrics:
            switches.append(int(metrics["precision_switch_step"]))
        shadow.append(metrics["shadow_fp8_loss"])
        losses.append(acc.reduce(loss.detach(), "mean").item())
    inner = acc.unwrap_model(model)
    converted = sum(isinstance(m, hf_nvfp4.NVFP4Linear) for m in inner.modules())
    st = inner.nvfp4_state  # each process its own SR stream: its rank, and a base seed of its own
    ranks = acc.gather(torch.tensor([st.rank])).tolist()
    bases = acc.gather(torch.tensor([st._base])).tolist()
    if acc.is_main_process:
        with open(sys.argv[1], "w") as f:
            json.dump({"losses": losses, "param_type": type(next(model.parameters())).__name__, "world": world,
                       "fsdp2_modules": sharded, "converted": converted,
                       "switch_steps": switches, "shadow_losses": shadow, "sr_ranks": ranks,
                       "sr_bases_distinct": len(set(bases)) == world}, f)
    acc.end_training()
