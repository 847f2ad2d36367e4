"""Thin launch script for multi-process runs: `fabric run` and `torchrun` need a script path.

    fabric run --accelerator cpu --devices 2 experiments/launch.py train --config experiments/eagle3/tiny_cpu.yaml
    torchrun --nproc-per-node 2 experiments/launch.py train --config experiments/eagle3/tiny_cpu.yaml
    # multi-node: torchrun --nnodes 2 --node-rank $NODE_RANK --master-addr $HEAD --master-port 29500 \
    #             --nproc-per-node 8 experiments/launch.py train --config experiments/eagle3/llama3_1_8b.yaml

Equivalent to `confu <subcommand> ...` in every process; Lightning picks up the launcher's
environment (RANK, WORLD_SIZE, MASTER_ADDR) through its TorchElasticEnvironment.
"""

import sys

from confu_lightning.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
