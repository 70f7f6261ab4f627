"""One process of a torchrun job (engine="ddp" or "deepspeed"): what `python th.py run RECIPE` starts once per
device, and what you start yourself on each node:

    torchrun --nproc_per_node=8 launchers/multinode.py --recipe recipes/ddp_translation.py --epochs=10 --batch_size=32
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST0 --master_port=29500 --nproc_per_node=8 \\
        launchers/multinode.py --recipe recipes/ddp_translation.py          # and --node_rank=1 on the other node
    torchrun --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 --rdzv_id=JOB --nproc_per_node=8 \\
        launchers/multinode.py --recipe recipes/ddp_translation.py

`batch_size` is per device: the global batch is batch_size x world_size x grad_accum (printed at start).
"""
import sys

from thcore.launch import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1:])
