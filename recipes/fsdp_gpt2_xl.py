"""GPT-2 XL (1.5B) through FSDP2: recipes/gpt2_xl_zero2.py's data and settings with the params, gradients and
optimizer state sharded over the ranks (torch's own ZeRO-3), each block all-gathered in bf16 for its forward and
backward and its gradients reduce-scattered in fp32.

    python th.py run recipes/fsdp_gpt2_xl.py --init_from=/path/to/hf/gpt2-xl            # one process per GPU
    python th.py run recipes/fsdp_gpt2_xl.py --offload=cpu                               # params in host memory
    torchrun --nnodes=2 --nproc_per_node=8 ... launchers/multinode.py --recipe recipes/fsdp_gpt2_xl.py \\
        --dp_replicate=2                                         # hybrid: replicated across the nodes, sharded within

Blocks are compiled one by one (FSDP's hooks stay between the compiled graphs) and recompute their activations
in backward. Checkpoints are whole tensors (the eager layout): any engine and any number of ranks resumes them.
"""
import attrs

from recipes.gpt2_xl_zero2 import Config as ZeRO2Config, build  # noqa: F401  (the same task)


@attrs.define(kw_only=True)
class Config(ZeRO2Config):
    engine: str = "fsdp"
    zero_stage: int = 0
    compile: bool = True
