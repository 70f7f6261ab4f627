"""The demo: a small encoder-decoder Transformer learns the built-in English-like -> German-like task
(reordering, agreement, number words) on one device. ~3 minutes on 2 CPU cores, exact match >= 0.90.

    python th.py run recipes/single_translation.py [--d_model=256 --num_heads=4 ...]
    python th.py run recipes/single_translation.py --train_src=a.en --train_tgt=a.de --valid_src=... --valid_tgt=...
"""
import attrs

from thcore.tasks.translation import TranslationConfig, TranslationTask


@attrs.define(kw_only=True)
class Config(TranslationConfig):
    d_model: int = 128
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    max_steps: int = 1000
    eval_every: int = 500
    log_every: int = 20
    label_smoothing: float = 0.1


def build(cfg: Config) -> TranslationTask:
    return TranslationTask(cfg)
