"""The encoder-decoder Transformer of "Attention is all you need" (Vaswani et al., 2017), for translation."""
import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import DecoderLayer, EncoderLayer, SinusoidalPositionalEncoding, init_in_place


class Transformer(nn.Module):
    """Defaults are the paper's base model. Post-LN as in the paper; `pre_ln=True` normalises each sub-layer's
    input instead and adds a final LayerNorm to the encoder and decoder outputs."""

    def __init__(self, src_vocab_size, tgt_vocab_size, d_model=512, num_heads=8, num_encoder_layers=6,
                 num_decoder_layers=6, d_ff=2048, dropout=0.1, max_len=256, activation="relu", pre_ln=False,
                 tie_embeddings=False, share_embeddings=False, pad_id=0, activation_checkpointing=False):
        super().__init__()
        self.pad_id = pad_id
        self.activation_checkpointing = activation_checkpointing
        self.emb_scale = math.sqrt(d_model)  # the paper multiplies embeddings by sqrt(d_model)

        self.src_embed = nn.Embedding(src_vocab_size, d_model)
        self.tgt_embed = nn.Embedding(tgt_vocab_size, d_model)
        self.pos = SinusoidalPositionalEncoding(d_model, max_len)
        self.dropout = nn.Dropout(dropout)
        layer_args = (d_model, num_heads, d_ff, dropout, activation, pre_ln)
        self.encoder = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(num_decoder_layers))
        # post-LN outputs are already normalised by each layer's last LayerNorm; pre-LN ones are not
        self.enc_norm = nn.LayerNorm(d_model) if pre_ln else nn.Identity()
        self.dec_norm = nn.LayerNorm(d_model) if pre_ln else nn.Identity()
        self.generator = nn.Linear(d_model, tgt_vocab_size, bias=not tie_embeddings)
        if tie_embeddings:
            self.generator.weight = self.tgt_embed.weight  # one tensor: named_parameters lists it once
        if share_embeddings:   # a joint source/target vocabulary: one embedding table for both sides
            if src_vocab_size != tgt_vocab_size:
                raise ValueError(f"share_embeddings needs one vocabulary: sizes {src_vocab_size} != {tgt_vocab_size}")
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

    def _run(self, layer, *args):
        # recompute the block in backward instead of keeping its activations; non-reentrant keeps the RNG state
        # (same dropout masks) and works with functional_call + autograd.grad
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    def encode(self, src):
        """src: LongTensor [B, S] padded with pad_id -> (memory [B, S, D], src_pad_mask bool [B, S])."""
        src_pad_mask = src == self.pad_id
        x = self.dropout(self.pos(self.src_embed(src) * self.emb_scale))
        for layer in self.encoder:
            x = self._run(layer, x, src_pad_mask)
        return self.enc_norm(x), src_pad_mask

    def decode(self, tgt_in, memory, src_pad_mask, cache=None):
        """tgt_in: LongTensor [B, T] -> logits [B, T, tgt_vocab]. The self-attention is causal only: target
        padding sits at the end, after every real token, and the loss ignores its positions.

        With a `cache` from new_cache() (inference), tgt_in holds only the tokens after the `cache["len"]`
        already decoded: each step costs one position instead of the whole prefix."""
        offset = 0 if cache is None else cache["len"]
        y = self.dropout(self.pos(self.tgt_embed(tgt_in) * self.emb_scale, offset))
        for i, layer in enumerate(self.decoder):
            if cache is None:
                y = self._run(layer, y, memory, src_pad_mask)
            else:
                y = layer(y, memory, src_pad_mask, cache["layers"][i])
        if cache is not None:
            cache["len"] += tgt_in.size(1)
        return self.generator(self.dec_norm(y))

    def new_cache(self) -> dict:
        """An empty decoder cache: per layer, self-attention keys/values so far and the projected memory."""
        return {"len": 0, "layers": [{"self": {}, "cross": {}} for _ in self.decoder]}

    @staticmethod
    def reorder_cache(cache: dict, index: torch.Tensor):
        """Keep rows `index` of every cached tensor (beam search: each new beam continues an old one)."""
        for layer in cache["layers"]:
            for part in layer.values():
                for k in part:
                    part[k] = part[k].index_select(0, index)

    def forward(self, src, tgt_in):
        return self.decode(tgt_in, *self.encode(src))

    def num_params(self, non_embedding=True) -> int:
        """Parameter count (tied tensors once); non_embedding leaves out the token embedding tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.src_embed.weight.numel() + self.tgt_embed.weight.numel() * (
                self.src_embed.weight is not self.tgt_embed.weight)
        return n
