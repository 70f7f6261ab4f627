"""Multi30k English -> German on a CPU: test BLEU >= 31 (sacrebleu, beam 5) in 45 minutes on 2 cores.

    python th.py run recipes/multi30k_en_de.py --data_dir=../shared/data/multi30k-en-de

A 256-wide 3+3-layer pre-LN Transformer (7.6M parameters) over a joint 8k BPE vocabulary (one embedding table
for source, target and output), batches of up to 1000 padded tokens per process from length buckets (small
batches: far from convergence, more updates help; a first run with 1500 and lr 1.5e-3, under heavier load,
ended at test BLEU 26.2), light
dropout (the model underfits in 45 minutes), label smoothing 0.1. The learning rate warms up over 150 steps
to 2e-3, then follows a cosine over the 45-minute budget (`max_minutes`): it reaches its floor when the time
runs out, on any machine. Valid BLEU (greedy, first 500 sentences) every 300 steps; at the end the whole valid
split (greedy) and the test split with beam search (beam 5). Results: docs/PERFORMANCE.md.

Two single-threaded DDP processes (gloo), not one process with two threads: on a 2-core machine shared with
other jobs, two threads synchronising thousands of times per step stall whenever one is descheduled, measured
up to 3x slower; the processes meet once per step. With GPUs th.py starts one process per GPU instead.
"""
import attrs

from thcore.tasks.translation import TranslationConfig, TranslationTask


@attrs.define(kw_only=True)
class Config(TranslationConfig):
    d_model: int = 256
    num_heads: int = 4
    num_encoder_layers: int = 3
    num_decoder_layers: int = 3
    d_ff: int = 1024
    dropout: float = 0.05
    pre_ln: bool = True
    tie_embeddings: bool = True
    share_embeddings: bool = True
    tokenizer: str = "bpe"
    vocab_size: int = 8000
    joint_vocab: bool = True
    max_len: int = 128
    max_tokens: int = 1000     # per process
    lr: float = 2e-3
    warmup_steps: int = 150
    lr_schedule: str = "cosine"
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    epochs: int = 100          # the time budget ends the run
    max_minutes: float = 45.0
    engine: str = "ddp"
    nproc: int = 2
    eval_every: int = 300
    eval_max_sentences: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    eval_batch_size: int = 200
    eval_beam: int = 1
    test_beam: int = 5
    length_penalty: float = 1.0


def build(cfg: Config) -> TranslationTask:
    return TranslationTask(cfg)
