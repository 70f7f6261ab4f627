"""Multi30k English -> German with the paper's base Transformer on a GPU (bf16).

    python th.py run recipes/multi30k_en_de_base.py --data_dir=../shared/data/multi30k-en-de

The CPU recipe's data and decoding (joint 8k BPE, one shared embedding table, token-count batches, valid BLEU
greedy, test BLEU with beam 5) around Transformer-base: 512 wide, 8 heads, 6+6 layers, d_ff 2048, pre-LN,
dropout 0.3 (Multi30k is small: 29k pairs). Batches of up to 8192 padded tokens per GPU; a 15-minute budget
(`max_minutes`) with the cosine over it. th.py starts one DDP process per GPU.
"""
import attrs

from recipes import multi30k_en_de as cpu


@attrs.define(kw_only=True)
class Config(cpu.Config):
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.3
    precision: str = "bf16"
    device: str = "cuda"
    nproc: int = 1
    max_tokens: int = 8192
    lr: float = 1e-3
    warmup_steps: int = 400
    max_minutes: float = 15.0
    eval_every: int = 300
    eval_batch_size: int = 500


build = cpu.build
