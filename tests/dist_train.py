"""Run a recipe under accelerate launch and record losses and the parameter type (for the tests)."""

import json
import sys

from transformers import TrainerCallback

from hf_nvfp4.recipe import load_recipe
from hf_nvfp4.train import run_recipe


class Record(TrainerCallback):
    def __init__(self):
        self.param_type = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.param_type = type(next(model.parameters())).__name__


if __name__ == "__main__":
    out, recipe_path, *overrides = sys.argv[1:]
    rec = Record()
    summary = run_recipe(load_recipe(recipe_path, overrides), extra_callbacks=[rec])
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        from pathlib import Path

        state = json.loads((Path(summary["checkpoint"]) / "summary.json").read_text())
        state["param_type"] = rec.param_type
        Path(out).write_text(json.dumps(state))
