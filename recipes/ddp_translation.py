"""The single-device demo (recipes/single_translation.py: same model, data and hyper-parameters) on DDP: one
process per GPU, or `nproc` (default 2) gloo processes on a CPU-only machine. `batch_size` is per device.

    python th.py run recipes/ddp_translation.py [--nproc=4 --ddp_comm_hook=bf16_compress ...]
    torchrun --nproc_per_node=8 launchers/multinode.py --recipe recipes/ddp_translation.py --epochs=10 --batch_size=32
"""
import attrs

from recipes import single_translation as single


@attrs.define(kw_only=True)
class Config(single.Config):
    engine: str = "ddp"
    nproc: int = 2   # CPU-only machine; with GPUs th.py starts one process per GPU unless --nproc is given


build = single.build
