"""A small character-level GPT on tiny Shakespeare, sized for 2 CPU cores (nanoGPT's CPU run of shakespeare_char).

    python th.py prepare --input=../shared/data/tinyshakespeare/input.txt --out=data/shakespeare_char --tokenizer=char
    python th.py run recipes/gpt2_shakespeare_char_cpu.py [--data_dir=data/shakespeare_char]
    python th.py generate runs/gpt2_shakespeare_char_cpu --prompt="ROMEO:" --max_new_tokens=200
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
    batch_size: int = 12
    lr: float = 1e-3
    warmup_steps: int = 100
    max_steps: int = 2000
    min_lr_ratio: float = 0.1
    beta2: float = 0.99
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_iters: int = 20
    log_every: int = 50


def build(cfg: Config) -> LMTask:
    return LMTask(cfg)


launcher = "single"
