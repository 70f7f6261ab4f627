"""GPT-2 XL (1.5B) through DeepSpeed ZeRO-2: nanoGPT's finetune_shakespeare settings on the BPE Shakespeare data.

    python th.py prepare --input=../shared/data/tinyshakespeare/input.txt --out=data/shakespeare \
        --tokenizer=gpt2 --tokenizer_dir=../shared/data/gpt2-tokenizer
    python th.py run recipes/gpt2_xl_zero2.py --init_from=/path/to/hf/gpt2-xl [--nproc=8]

micro-batch 1 x grad accumulation 32 per rank, lr 3e-5 constant, a 1024-token context, bf16. ZeRO-2 partitions
gradients and optimizer state over the ranks; the engine turns on contiguous_gradients and (on GPUs)
overlap_comm for stages >= 2. Without --init_from the 1.5B model starts from random weights (an engine test, not a
fine-tune). A Hugging Face directory (config.json + model.safetensors) is read offline: nothing is downloaded.
"""
import attrs

from thcore.models.gpt import GPT_PRESETS
from thcore.tasks.lm import LMConfig, LMTask

XL = GPT_PRESETS["gpt2-xl"]


@attrs.define(kw_only=True)
class Config(LMConfig):
    data_dir: str = "data/shakespeare"
    init_from: str = ""             # e.g. a Hugging Face gpt2-xl directory; its shape replaces the fields below
    n_layer: int = XL["n_layer"]
    n_head: int = XL["n_head"]
    n_embd: int = XL["n_embd"]
    block_size: int = 1024
    bias: bool = True               # as GPT-2
    dropout: float = 0.0
    engine: str = "deepspeed"
    zero_stage: int = 2
    precision: str = "bf16"
    batch_size: int = 1             # micro-batch per rank
    grad_accum: int = 32
    lr: float = 3e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta2: float = 0.95
    max_steps: int = 20
    eval_every: int = 5
    eval_iters: int = 20
    log_every: int = 1
    always_save_checkpoint: bool = False   # checkpoints of 1.5B params (+ optimizer) are large: best + last only
    activation_checkpointing: bool = True


def build(cfg: Config) -> LMTask:
    return LMTask(cfg)
