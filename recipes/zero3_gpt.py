"""A GPT trained with ZeRO-3 + CPU offload + activation checkpointing: parameters and optimizer state live
partitioned in host memory (DeepSpeedCPUAdam updates them there), each rank gathers one block's weights at a
time onto its device, and only block inputs are kept for backward. This is how a model whose optimizer state would
not fit one device trains. The defaults are sized for a CPU try-out on the character-level Shakespeare data; on
GPUs pick a size (GPT_PRESETS in thcore/models/gpt.py, or --init_from a Hugging Face GPT-2 directory).

    python th.py prepare --input=../shared/data/tinyshakespeare/input.txt --out=data/shakespeare_char --tokenizer=char
    python th.py run recipes/zero3_gpt.py [--nproc=2 --max_steps=200 ...]
    python th.py run recipes/zero3_gpt.py --data_dir=data/shakespeare --n_layer=48 --n_head=25 --n_embd=1600 \\
        --block_size=1024 --batch_size=8 --precision=bf16 --device=cuda          # GPT-2 XL shape, on GPUs
    python th.py export runs/zero3_gpt out/          # consolidated fp32 weights (an eager checkpoint)
"""
import attrs

from thcore.tasks.lm import LMConfig, LMTask


@attrs.define(kw_only=True)
class Config(LMConfig):
    data_dir: str = "data/shakespeare_char"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    batch_size: int = 12            # per rank
    lr: float = 1e-3
    warmup_steps: int = 20
    max_steps: int = 200
    eval_every: int = 100
    eval_iters: int = 10
    log_every: int = 10
    engine: str = "deepspeed"
    nproc: int = 2                  # CPU; on GPUs: one process each
    zero_stage: int = 3
    offload: str = "cpu"
    activation_checkpointing: bool = True


def build(cfg: Config) -> LMTask:
    return LMTask(cfg)
