"""A small character-level GPT on tiny Shakespeare, sized for 2 CPU cores: val loss ~1.76 in ~100 s.

    python th.py prepare --input=../shared/data/tinyshakespeare/input.txt --out=data/shakespeare_char --tokenizer=char
    python th.py run recipes/gpt2_shakespeare_char_cpu.py [--data_dir=data/shakespeare_char]
    python th.py generate runs/gpt2_shakespeare_char_cpu --prompt="ROMEO:" --max_new_tokens=200

nanoGPT's CPU run of shakespeare_char (4 layers x 128, batch 12 x 64, lr 1e-3, 2000 iterations) reaches val
1.88 in ~150 s. With a fixed time budget the model is far from converged (~2 tokens per parameter), so a
shallower model that sees more tokens per second learns more: 2 layers (2.3x the tokens/s on 2 cores), a batch
of 32 windows (fewer, larger matmuls), and a higher lr, which a 2-layer model tolerates; the cosine schedule
is 1000 steps long. Measured in docs/PERFORMANCE.md ("GPT-2 on CPU").
"""
import attrs

from thcore.tasks.lm import LMConfig, LMTask


@attrs.define(kw_only=True)
class Config(LMConfig):
    data_dir: str = "data/shakespeare_char"
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0          # far from overfitting in 1000 steps
    batch_size: int = 32
    lr: float = 5e-3
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    beta2: float = 0.99
    weight_decay: float = 0.1
    eval_every: int = 250
    eval_iters: int = 20          # 20 x 32 windows per estimate: cheap, and the same windows every eval
    log_every: int = 50


def build(cfg: Config) -> LMTask:
    return LMTask(cfg)
