"""nanoGPT's shakespeare_char: a 6-layer, 384-wide character-level GPT with a 256-character context, sized for
a GPU (nanoGPT reports val 1.4697 after 5000 iterations). On a CPU use gpt2_shakespeare_char_cpu.py.

    python th.py prepare --input=../shared/data/tinyshakespeare/input.txt --out=data/shakespeare_char --tokenizer=char
    python th.py run recipes/gpt2_shakespeare_char.py [--data_dir=data/shakespeare_char]
    python th.py generate runs/gpt2_shakespeare_char --prompt="ROMEO:" --max_new_tokens=500 --device=cuda
"""
import attrs

from thcore.tasks.lm import LMConfig, LMTask


@attrs.define(kw_only=True)
class Config(LMConfig):
    data_dir: str = "data/shakespeare_char"
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.2
    bias: bool = False
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-3
    max_steps: int = 5000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1    # min lr 1e-4 at the end of the cosine
    beta2: float = 0.99          # a little larger than nanoGPT's 0.95 default: few tokens per step
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_iters: int = 200
    log_every: int = 10
    always_save_checkpoint: bool = False   # tiny data: it overfits, so keep the best val checkpoint only
    precision: str = "bf16"
    compile: bool = True


def build(cfg: Config) -> LMTask:
    return LMTask(cfg)
