"""Building blocks shared by the encoder-decoder Transformer and GPT.

Shapes: B batch, T query length, S key length, D model width, H heads, Dh = D // H.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def sample(spec: tuple, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill `t` in place as a model's `init_spec` says: ("normal", std), ("uniform", bound) or ("const", value).
    thcore/weights.py draws each parameter from its own generators; a model's constructor uses the global RNG."""
    kind, a = spec
    if kind == "normal":
        return nn.init.normal_(t, 0.0, a, generator=generator)
    if kind == "uniform":
        return nn.init.uniform_(t, -a, a, generator=generator)
    if kind == "const":
        return nn.init.constant_(t, a)
    raise ValueError(f"init spec {spec!r}: kind must be normal, uniform or const")


def init_in_place(model: nn.Module) -> None:
    """Every parameter of `model` drawn as its `init_spec` says, from the global RNG (a constructor's init)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            sample(model.init_spec(name, p.shape), p)


class SinusoidalPositionalEncoding(nn.Module):
    """The fixed sin/cos table of "Attention is all you need" (section 3.5), added to the embeddings.

    PE[pos, 2i] = sin(pos / 10000^(2i/D)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/D)).
    A non-persistent buffer: never a parameter, never in state_dict, rebuilt from (d_model, max_len)."""

    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.register_buffer("pe", self.table(None), persistent=False)

    def table(self, device) -> torch.Tensor:
        """The [max_len, d_model] table, made on `device` (None: the default one)."""
        pos = torch.arange(self.max_len, dtype=torch.float32, device=device)[:, None]
        inv_freq = torch.exp(torch.arange(0, self.d_model, 2, dtype=torch.float32, device=device)
                             * (-math.log(10000.0) / self.d_model))
        pe = torch.zeros(self.max_len, self.d_model, device=device)
        pe[:, 0::2] = torch.sin(pos * inv_freq)
        pe[:, 1::2] = torch.cos(pos * inv_freq[: self.d_model // 2])  # d_model // 2 columns when D is odd
        return pe

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.size(1)
        if offset + T > self.max_len:
            raise ValueError(f"positions {offset}..{offset + T - 1} exceed the positional table "
                             f"(max_len={self.max_len})")
        return x + self.pe[offset:offset + T].to(x.dtype)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, D] -> [B, H, T, Dh]."""
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dh] -> [B, T, D]."""
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)


def attention(q, k, v, *, key_padding_mask=None, causal=False, dropout_p=0.0):
    """softmax(q k^T / sqrt(Dh) + mask) v over [B, H, T, Dh] tensors, through F.scaled_dot_product_attention.

    key_padding_mask: bool [B, S], True = padding (never attended to). causal: the T queries are the last T of
    the S key positions (S > T after a KV cache's prefix), so query i sees keys 0..S-T+i. The caller passes
    dropout_p=0 in eval mode."""
    T, S = q.size(-2), k.size(-2)
    if key_padding_mask is None and (not causal or T == S):
        # no mask tensor: SDPA can pick its flash / memory-efficient kernels
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]   # True = may attend
    if causal and T > 1:   # explicit: SDPA's is_causal aligns top-left, wrong once keys outnumber queries
        tri = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        mask = tri if mask is None else mask & tri
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class KVCache:
    """Keys and values of the tokens decoded so far, for both families' incremental decoding (GPT sampling,
    Transformer greedy and beam search): a step then costs its new tokens, not the prefix.

    Per layer, the self-attention keys/values [B, H, capacity, Dh] filled up to `pos`, and cross-attention's
    projected memory, made once. The capacity doubles as decoding goes (up to `max_len`), so memory follows the
    length decoded and a step copies nothing but its own keys. The model advances `pos` once all its layers have
    seen the step. Only for inference: written in place."""

    def __init__(self, n_layer: int, max_len: int):
        self.max_len, self.pos = max_len, 0
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.memory = [None] * n_layer   # (k, v) of the encoder output, per decoder layer

    def update(self, layer: int, k, v):
        """Store the new tokens' k, v [B, H, T, Dh] at positions pos..pos+T-1; return all keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions: {end} asked for")
        if self.k[layer] is None or self.k[layer].size(2) < end:
            size = min(self.max_len, max(end, 2 * self.pos, 16))
            for store, new in ((self.k, k), (self.v, v)):
                grown = new.new_zeros(*new.shape[:2], size, new.size(3))
                if store[layer] is not None:
                    grown[:, :, :self.pos] = store[layer][:, :, :self.pos]
                store[layer] = grown
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` of every cached tensor (beam search: each new beam continues an old one)."""
        for store in (self.k, self.v):
            store[:] = [None if t is None else t.index_select(0, index) for t in store]
        self.memory = [None if m is None else tuple(t.index_select(0, index) for t in m) for m in self.memory]


class Attention(nn.Module):
    """Multi-head attention, once for both families: a subclass names the projections (their names are the
    checkpoints'); the heads, the KV cache and the attention itself are here.

    forward(x, memory=None, ...): x [B, T, D] queries; memory [B, S, D] keys/values (None = self-attention).
    With a `cache` (inference), self-attention appends the new tokens' keys/values to the earlier ones and
    cross-attention projects `memory` once, at the first step."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout

    def project(self, x, kv):
        """(q, k, v) [B, *, D] of queries `x` and keys/values `kv` (None: q only, k and v None)."""
        raise NotImplementedError

    def output(self, y):
        raise NotImplementedError

    def forward(self, x, memory=None, key_padding_mask=None, causal=False, cache: KVCache | None = None,
                layer: int = 0):
        cross = memory is not None
        reuse = cross and cache is not None and cache.memory[layer] is not None
        q, k, v = (split_heads(t, self.num_heads) if t is not None else None
                   for t in self.project(x, None if reuse else memory if cross else x))
        if reuse:
            k, v = cache.memory[layer]
        elif cache is not None and cross:
            cache.memory[layer] = (k, v)
        elif cache is not None:
            k, v = cache.update(layer, k, v)
        y = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                      dropout_p=self.dropout if self.training else 0.0)
        return self.output(merge_heads(y))


class MultiHeadAttention(Attention):
    """Separate q/k/v projections, so one class serves self- and cross-attention (the Transformer's)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__(d_model, num_heads, dropout)
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def project(self, x, kv):
        if kv is None:
            return self.q_proj(x), None, None
        return self.q_proj(x), self.k_proj(kv), self.v_proj(kv)

    def output(self, y):
        return self.out_proj(y)


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """Position-wise feed-forward network: linear1 -> activation -> dropout -> linear2."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.linear2(self.dropout(ACTIVATIONS[self.activation](self.linear1(x))))


class _Residual(nn.Module):
    """Base for the Transformer layers: one residual connection around a sub-layer, with dropout on the
    sub-layer output (the paper's residual dropout) and LayerNorm after the sum (post-LN, the paper) or on
    the sub-layer input (pre-LN: trains without warm-up tricks at depth)."""

    def __init__(self, dropout: float, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.dropout = nn.Dropout(dropout)

    def residual(self, x, norm, sublayer):
        if self.pre_ln:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


class EncoderLayer(_Residual):
    """Self-attention over the source (padding masked), then the feed-forward network."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, activation="relu", pre_ln=False):
        super().__init__(dropout, pre_ln)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x, src_pad_mask=None):
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, key_padding_mask=src_pad_mask))
        return self.residual(x, self.norm2, self.ffn)


class DecoderLayer(_Residual):
    """Causal self-attention over the target, cross-attention over the encoder output, feed-forward."""

    def __init__(self, d_model, num_heads, d_ff, dropout=0.1, activation="relu", pre_ln=False):
        super().__init__(dropout, pre_ln)
        self.self_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, num_heads, dropout)
        self.ffn = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, x, memory, src_pad_mask=None, cache: KVCache | None = None, layer: int = 0):
        """cache: None (training) or the decoder's KVCache (incremental decoding), this is its `layer`."""
        x = self.residual(x, self.norm1, lambda h: self.self_attn(h, causal=True, cache=cache, layer=layer))
        x = self.residual(x, self.norm2, lambda h: self.cross_attn(h, memory, key_padding_mask=src_pad_mask,
                                                                   cache=cache, layer=layer))
        return self.residual(x, self.norm3, self.ffn)
