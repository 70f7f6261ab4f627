"""recipes/zero2_translation.py at ZeRO-3: the parameters are partitioned too, gathered layer by layer in each
forward and backward (evaluation and greedy decoding as well), so no rank ever holds the whole model.

    python th.py run recipes/zero3_translation.py [--offload=cpu ...]      # cpu: optimizer and params in host memory
    torchrun --nproc_per_node=2 launchers/multinode.py --recipe recipes/zero3_translation.py
    python th.py export runs/zero3_translation out/ && \\
        python th.py run recipes/single_translation.py --resume=out/ --out_dir=runs/from_zero3   # no DeepSpeed
"""
import os

import attrs

from thcore.recipe import load

zero2 = load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "zero2_translation.py"))
_fields = attrs.fields(zero2.Config)


@attrs.define(kw_only=True)
class Config(zero2.Config):
    zero_stage: int = attrs.field(default=3, validator=_fields.zero_stage.validator)


build = zero2.build
launcher = "multinode"
