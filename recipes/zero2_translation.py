"""The single-device demo (recipes/single_translation.py: same model, data and hyper-parameters) on DeepSpeed
ZeRO-2: gradients and optimizer state partitioned over the ranks. One process per GPU, or `nproc` (default 2)
gloo processes on DeepSpeed's CPU accelerator. `batch_size` is per device.

    python th.py run recipes/zero2_translation.py [--nproc=4 --offload=cpu --precision=bf16 ...]
    python th.py run recipes/zero2_translation.py --deepspeed_config=ds_config.json     # your config, as-is
    torchrun --nproc_per_node=8 launchers/multinode.py --recipe recipes/zero2_translation.py
    deepspeed --no_local_rank --num_gpus=8 launchers/multinode.py --recipe recipes/zero2_translation.py
    python th.py export runs/zero2_translation out/                  # consolidated fp32 weights, an eager checkpoint
"""
import attrs

from recipes import single_translation as single


@attrs.define(kw_only=True)
class Config(single.Config):
    engine: str = "deepspeed"
    nproc: int = 2   # CPU; on GPUs: one process each
    zero_stage: int = 2


build = single.build
