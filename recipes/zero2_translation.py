"""The single-device demo (recipes/single_translation.py: same model, data and hyper-parameters) on DeepSpeed
ZeRO-2: gradients and optimizer state partitioned over the ranks. One process per GPU, or `nproc` (default 2)
gloo processes on DeepSpeed's CPU accelerator. `batch_size` is per device.

    python th.py run recipes/zero2_translation.py [--nproc=4 --offload=cpu --precision=bf16 ...]
    python th.py run recipes/zero2_translation.py --deepspeed_config=ds_config.json     # your config, as-is
    torchrun --nproc_per_node=8 launchers/multinode.py --recipe recipes/zero2_translation.py
    deepspeed --no_local_rank --num_gpus=8 launchers/multinode.py --recipe recipes/zero2_translation.py
    python th.py export runs/zero2_translation out/                  # consolidated fp32 weights, an eager checkpoint
"""
import os

import attrs

from thcore.recipe import load

single = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "single_translation.py"))
_fields = attrs.fields(single.Config)


@attrs.define(kw_only=True)
class Config(single.Config):
    engine: str = attrs.field(default="deepspeed", validator=_fields.engine.validator)
    nproc: int = attrs.field(default=2, validator=_fields.nproc.validator)   # CPU; on GPUs: one process each
    zero_stage: int = attrs.field(default=2, validator=_fields.zero_stage.validator)


build = single.build
launcher = "multinode"
