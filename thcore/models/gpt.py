"""GPT-2 in nanoGPT's layout: module and parameter names match nanoGPT (and so map onto Hugging Face's GPT-2)."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import attention, init_in_place, merge_heads, split_heads

GPT_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


class KVCache:
    """Keys and values of the tokens seen so far, for sampling one token at a time without recomputing the
    prefix. One preallocated [B, H, max_len, Dh] pair per layer; `pos` tokens are filled.

    Only for inference: the model writes into it in place (training never passes one)."""

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=torch.float32):
        shape = (batch_size, n_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len, self.pos = max_len, 0

    def update(self, layer, k, v):
        """Store the new tokens' k, v [B, H, T, Dh] at positions pos..pos+T-1; return all keys/values so far."""
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Causal self-attention with one fused q/k/v projection (GPT-2's c_attn)."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True):
        super().__init__()
        if n_embd % n_head != 0:
            raise ValueError(f"d_model ({n_embd}) must be divisible by num_heads ({n_head})")
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None, layer=0):
        q, k, v = (split_heads(t, self.n_head) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if cache is not None:
            k, v = cache.update(layer, k, v)   # keys/values of every token so far, the new ones last
        T, S = q.size(2), k.size(2)
        if T == S:   # no cached prefix: the usual causal attention
            y = attention(q, k, v, causal=True, dropout_p=self.dropout if self.training else 0.0)
        else:
            # T new queries after S - T cached tokens: query i sees keys 0..S-T+i. SDPA's is_causal aligns the
            # mask top-left (wrong once keys outnumber queries), so it is explicit; a single query sees all.
            mask = None if T == 1 else torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, n_embd, dropout=0.0, bias=True):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation of GELU; the exact one would shift pretrained outputs
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def padded_vocab(vocab_size: int, multiple: int = 64) -> int:
    """Rows of the token embedding / output layer holding `vocab_size` tokens, a multiple of `multiple`: the output
    layer's matmul then has tensor-core friendly shapes (GPT-2's 50257 -> 50304: nanoGPT measured ~25% on the
    whole step)."""
    return -(-vocab_size // multiple) * multiple


def pad_vocab(params: dict, rows: int) -> dict:
    """`params` with the token embedding at `rows` rows (`rows` >= the real vocabulary): grown by zero rows
    (weights from Hugging Face or an unpadded run) or cut (a run padded to another multiple: only pad rows go).
    The pad rows get no gradient (the logits are cropped), so zero rows stay zero."""
    key = "transformer.wte.weight"
    w = params.get(key)
    if w is None or w.shape[0] == rows:
        return params
    if w.shape[0] > rows:
        return {**params, key: w[:rows].contiguous()}
    return {**params, key: torch.cat([w, w.new_zeros(rows - w.shape[0], w.shape[1])])}


class GPT(nn.Module):
    """Decoder-only language model. `vocab_multiple=64` pads the token embedding / output layer to a multiple of 64
    rows inside (padded_vocab); the logits are always those of the `vocab_size` real tokens."""

    def __init__(self, vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
                 bias=True, activation_checkpointing=False, vocab_multiple=1):
        super().__init__()
        self.block_size, self.vocab_size = block_size, vocab_size
        self.activation_checkpointing = activation_checkpointing
        rows = padded_vocab(vocab_size, vocab_multiple)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(rows, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.lm_head = nn.Linear(n_embd, rows, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying; listed once, as transformer.wte.weight

        self.n_layer = n_layer
        init_in_place(self)

    def init_spec(self, name: str, shape) -> tuple:
        """GPT-2 init of parameter `name` (models/layers.py: sample): N(0, 0.02) weights, zero biases, LayerNorm
        1 and 0; residual projections scaled by 1/sqrt(2 * n_layer) so the residual stream's variance does not
        grow with depth."""
        owner, _, leaf = name.rpartition(".")
        if isinstance(self.get_submodule(owner), nn.LayerNorm):
            return ("const", 1.0 if leaf == "weight" else 0.0)
        if leaf == "bias":
            return ("const", 0.0)
        # Linear and Embedding weights
        return ("normal", 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("c_proj.weight") else 0.02)

    def init_buffers(self, device) -> dict:
        """The buffers a meta-built model needs made (GPT has none)."""
        return {}

    @classmethod
    def from_preset(cls, name, **overrides):
        """GPT.from_preset("gpt2", vocab_size=50257): a preset's shape, any constructor argument overridden."""
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(GPT_PRESETS)}")
        return cls(**{**GPT_PRESETS[name], **overrides})

    # the output layer's (weight, bias) names in named_parameters(): the fused loss (thcore/losses.py) applies it
    # to `features` itself, chunk by chunk; the weight is wte's (tied)
    output_params = ("transformer.wte.weight", None)

    def forward(self, idx, cache: KVCache | None = None):
        """idx: LongTensor [B, T] -> logits [B, T, vocab_size].

        With a `cache` (inference), idx holds the tokens that follow the `cache.pos` cached ones: positions
        start there, and the cache is advanced past them."""
        logits = self.lm_head(self.features(idx, cache))
        # the padded columns are cut off (a view): softmax, loss and sampling see the real tokens only
        return logits[..., :self.vocab_size] if logits.size(-1) != self.vocab_size else logits

    def features(self, idx, cache: KVCache | None = None):
        """The final LayerNorm's output [B, T, n_embd]: forward without the output layer."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.block_size:
            raise ValueError(f"cannot forward a sequence of length {start + T}: block_size is {self.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if cache is not None:
                x = block(x, cache, i)
            elif self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # recompute in backward; RNG state preserved
            else:
                x = block(x)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def new_cache(self, batch_size, device=None, dtype=torch.float32) -> KVCache:
        """An empty KV cache for up to block_size tokens of `batch_size` sequences."""
        attn = self.transformer.h[0].attn
        return KVCache(len(self.transformer.h), batch_size, attn.n_head, self.block_size,
                       attn.n_embd // attn.n_head, device, dtype)

    def num_params(self, non_embedding=True) -> int:
        """Parameter count (the tied wte/lm_head once); non_embedding leaves out the position embeddings,
        as nanoGPT (the token embeddings stay: they are also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n
