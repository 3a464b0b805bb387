"""Pretrain with a recipe: a thin wrapper over ``hf-nvfp4 train`` for ``accelerate launch``.

python examples/pretrain.py --recipe tiny-cpu
accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml examples/pretrain.py --recipe tiny-cpu
"""

import sys

from hf_nvfp4.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
