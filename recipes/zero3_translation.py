"""recipes/zero2_translation.py at ZeRO-3: the parameters are partitioned too, gathered layer by layer in each
forward and backward (evaluation and greedy decoding as well), so no rank ever holds the whole model.

    python th.py run recipes/zero3_translation.py [--offload=cpu ...]      # cpu: optimizer and params in host memory
    torchrun --nproc_per_node=2 launchers/multinode.py --recipe recipes/zero3_translation.py
    python th.py export runs/zero3_translation out/ && \\
        python th.py run recipes/single_translation.py --resume=out/ --out_dir=runs/from_zero3   # no DeepSpeed
"""
import attrs

from recipes import zero2_translation as zero2


@attrs.define(kw_only=True)
class Config(zero2.Config):
    zero_stage: int = 3


build = zero2.build
