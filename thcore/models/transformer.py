"""The encoder-decoder Transformer of "Attention is all you need" (Vaswani et al., 2017), for translation."""
import math

import attrs
from torch import nn

from .config import ModelConfig
from .layers import DecoderLayer, EncoderLayer, KVCache, SinusoidalPositionalEncoding, init_in_place


@attrs.frozen(kw_only=True, eq=False)   # equality: ModelConfig's
class TransformerConfig(ModelConfig):
    """The Transformer's shape (models/config.py); defaults are the paper's base model."""
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 512             # width; heads of d_model // num_heads
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048               # feed-forward width
    dropout: float = 0.1
    max_len: int = 256             # positions of the sinusoidal table (tokens per sentence, bos included)
    activation: str = "relu"       # of the feed-forward network: relu | gelu
    pre_ln: bool = False           # LayerNorm on each sub-layer's input (and final ones) instead of after it
    tie_embeddings: bool = False   # output layer = target embedding
    share_embeddings: bool = False   # one table for source and target (a joint vocabulary)
    pad_id: int = 0

    def build(self) -> "Transformer":
        return Transformer(self)

    def flops(self, batch_size: int, src_len: int, tgt_len: int) -> float:
        """Training FLOPs of a [B, S] -> [B, T] batch (thcore/perf.py): 6 N + 12 L D (attention length) per
        token, encoder parameters (and cross-attention's key/value projections) per source token, the rest of
        the decoder and the output layer per target token; the embedding tables are lookups, not matmuls."""
        d, f = self.d_model, self.d_ff
        attn, ffn, norm = 4 * (d * d + d), 2 * d * f + f + d, 2 * d
        final_norm = norm if self.pre_ln else 0
        n_enc = self.num_encoder_layers * (attn + ffn + 2 * norm) + final_norm
        n_cross_kv = self.num_decoder_layers * 2 * (d * d + d)
        n_dec = self.num_decoder_layers * (2 * attn + ffn + 3 * norm) - n_cross_kv + final_norm
        n_out = self.tgt_vocab_size * d + (0 if self.tie_embeddings else self.tgt_vocab_size)
        src = 6.0 * (n_enc + n_cross_kv) + 12.0 * self.num_encoder_layers * d * src_len
        tgt = 6.0 * (n_dec + n_out) + 12.0 * self.num_decoder_layers * d * (tgt_len + src_len)
        return batch_size * (src_len * src + tgt_len * tgt)

    def step_flops(self, batch: dict) -> float:
        (B, S), T = batch["src"].shape, batch["tgt_in"].shape[1]
        return self.flops(B, S, T)


class Transformer(nn.Module):
    """The encoder-decoder of a TransformerConfig: Transformer(config), or Transformer(src_vocab_size,
    tgt_vocab_size, **fields) for the same thing. Post-LN as in the paper; `pre_ln=True` normalises each
    sub-layer's input instead and adds a final LayerNorm to the encoder and decoder outputs."""

    def __init__(self, config: TransformerConfig | int, tgt_vocab_size: int | None = None, **fields):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            config = TransformerConfig(src_vocab_size=config, tgt_vocab_size=tgt_vocab_size, **fields)
        elif tgt_vocab_size is not None or fields:
            raise TypeError("Transformer(config) or Transformer(src_vocab_size, tgt_vocab_size, **fields)")
        self.config = c = config
        self.pad_id = c.pad_id
        self.emb_scale = math.sqrt(c.d_model)  # the paper multiplies embeddings by sqrt(d_model)

        self.src_embed = nn.Embedding(c.src_vocab_size, c.d_model)
        self.tgt_embed = nn.Embedding(c.tgt_vocab_size, c.d_model)
        self.pos = SinusoidalPositionalEncoding(c.d_model, c.max_len)
        self.dropout = nn.Dropout(c.dropout)
        layer_args = (c.d_model, c.num_heads, c.d_ff, c.dropout, c.activation, c.pre_ln)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(c.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(c.num_decoder_layers))
        # post-LN outputs are already normalised by each layer's last LayerNorm; pre-LN ones are not
        self.enc_norm = nn.LayerNorm(c.d_model) if c.pre_ln else nn.Identity()
        self.dec_norm = nn.LayerNorm(c.d_model) if c.pre_ln else nn.Identity()
        self.generator = nn.Linear(c.d_model, c.tgt_vocab_size, bias=not c.tie_embeddings)
        if c.tie_embeddings:
            self.generator.weight = self.tgt_embed.weight  # one tensor: named_parameters lists it once
        if c.share_embeddings:   # a joint source/target vocabulary: one embedding table for both sides
            if c.src_vocab_size != c.tgt_vocab_size:
                raise ValueError(f"share_embeddings needs one vocabulary: sizes {c.src_vocab_size} != "
                                 f"{c.tgt_vocab_size}")
            self.src_embed.weight = self.tgt_embed.weight

        init_in_place(self)

    def init_spec(self, name: str, shape) -> tuple:
        """The init of parameter `name` (models/layers.py: sample): Xavier-uniform for every matrix, as the
        reference implementations (tensor2tensor, Annotated Transformer); torch's defaults otherwise (Linear
        biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm 1 and 0)."""
        owner, _, leaf = name.rpartition(".")
        module = self.get_submodule(owner)
        if len(shape) == 2:   # [fan_out, fan_in]
            return ("uniform", math.sqrt(6.0 / (shape[0] + shape[1])))
        if isinstance(module, nn.LayerNorm):
            return ("const", 1.0 if leaf == "weight" else 0.0)
        if isinstance(module, nn.Linear):
            return ("uniform", 1 / math.sqrt(module.in_features))
        raise ValueError(f"{name}: no init rule for a {type(module).__name__} parameter of shape {tuple(shape)}")

    def init_buffers(self, device) -> dict:
        """The buffers a meta-built model needs made: the sinusoidal table."""
        return {"pos.pe": self.pos.table(device)}

    def encode(self, src):
        """src: LongTensor [B, S] padded with pad_id -> (memory [B, S, D], src_pad_mask bool [B, S])."""
        src_pad_mask = src == self.pad_id
        x = self.dropout(self.pos(self.src_embed(src) * self.emb_scale))
        for layer in self.encoder:
            x = layer(x, src_pad_mask)
        return self.enc_norm(x), src_pad_mask

    def decode(self, tgt_in, memory, src_pad_mask, cache=None):
        """tgt_in: LongTensor [B, T] -> logits [B, T, tgt_vocab]. The self-attention is causal only: target
        padding sits at the end, after every real token, and the loss ignores its positions.

        With a `cache` from new_cache() (inference), tgt_in holds only the tokens after the `cache.pos`
        already decoded: each step costs one position instead of the whole prefix."""
        offset = 0 if cache is None else cache.pos
        y = self.dropout(self.pos(self.tgt_embed(tgt_in) * self.emb_scale, offset))
        for i, layer in enumerate(self.decoder):
            y = layer(y, memory, src_pad_mask) if cache is None else layer(y, memory, src_pad_mask, cache, i)
        if cache is not None:
            cache.pos += tgt_in.size(1)
        return self.generator(self.dec_norm(y))

    def new_cache(self) -> KVCache:
        """An empty decoder cache (models/layers.py): per layer, the self-attention keys/values so far and the
        projected memory; beam search reorders it with `cache.reorder(index)`."""
        return KVCache(len(self.decoder), self.pos.max_len)

    def forward(self, src, tgt_in):
        return self.decode(tgt_in, *self.encode(src))

    def num_params(self, non_embedding=True) -> int:
        """Parameter count (tied tensors once); non_embedding leaves out the token embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.src_embed.weight.numel() + self.tgt_embed.weight.numel() * (
                self.src_embed.weight is not self.tgt_embed.weight)
        return n
