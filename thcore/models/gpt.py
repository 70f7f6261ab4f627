"""GPT-2 in nanoGPT's layout: module and parameter names match nanoGPT (and so map onto Hugging Face's GPT-2)."""
import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Attention, KVCache, init_in_place

GPT_PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


@attrs.frozen(kw_only=True, eq=False)   # equality: ModelConfig's
class GPTConfig(ModelConfig):
    """The GPT's shape (models/config.py). `vocab_multiple` pads the token embedding / output layer to a multiple
    of that many rows (padded_vocab); the logits are always those of the `vocab_size` real tokens."""
    vocab_size: int = 50304      # real tokens: the logits' width
    block_size: int = 1024       # positions (the longest context)
    n_layer: int = 12            # blocks
    n_head: int = 12
    n_embd: int = 768            # width; heads of n_embd // n_head
    dropout: float = 0.0
    bias: bool = True            # in every Linear and LayerNorm (GPT-2 has them)
    vocab_multiple: int = 1      # token embedding rows: vocab_size padded to a multiple of this

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """GPTConfig.preset("gpt2", vocab_size=50257): a preset's shape, any field overridden."""
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT preset {name!r}; choose one of {sorted(GPT_PRESETS)}")
        return cls(**{**GPT_PRESETS[name], **overrides})

    @property
    def rows(self) -> int:
        return padded_vocab(self.vocab_size, self.vocab_multiple)

    def build(self) -> "GPT":
        return GPT(self)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (thcore/perf.py): 6 N + 12 L H Q T, N the parameters without the position
        embeddings (the padded token rows count: the output matmul computes them), H Q = n_embd."""
        d, bias = self.n_embd, self.bias
        block = 12 * d * d + 2 * d + 11 * d * bias   # c_attn, c_proj, c_fc, mlp.c_proj; two LayerNorms
        n = self.rows * d + self.n_layer * block + d + d * bias   # wte (also the output layer), blocks, ln_f
        return 6.0 * n + 12.0 * self.n_layer * d * seq_len

    def step_flops(self, batch: dict) -> float:
        B, T = batch["idx"].shape
        return B * T * self.flops_per_token(T)


class CausalSelfAttention(Attention):
    """Causal self-attention with one fused q/k/v projection (GPT-2's c_attn)."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True):
        super().__init__(n_embd, n_head, dropout)
        self.n_embd = n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def project(self, x, kv):
        return self.c_attn(x).split(self.n_embd, dim=2)   # self-attention only: kv is x

    def output(self, y):
        return self.resid_dropout(self.c_proj(y))


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
        x = x + self.attn(self.ln_1(x), causal=True, cache=cache, layer=layer)
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
    """Decoder-only language model of a GPTConfig: GPT(config), or GPT(**fields) for the same thing."""

    def __init__(self, config: GPTConfig | None = None, **fields):
        super().__init__()
        if config is not None and fields:
            raise TypeError("GPT(config) or GPT(**fields), not both")
        self.config = c = config if config is not None else GPTConfig(**fields)
        self.vocab_size = c.vocab_size   # the real tokens' rows of the output layer (the fused loss reads it)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.rows, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout, c.bias) for _ in range(c.n_layer)),
            ln_f=nn.LayerNorm(c.n_embd, bias=c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.rows, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying; listed once, as transformer.wte.weight
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
        return ("normal", 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02)

    def init_buffers(self, device) -> dict:
        """The buffers a meta-built model needs made (GPT has none)."""
        return {}

    @classmethod
    def from_preset(cls, name, **overrides):
        """GPT.from_preset("gpt2", vocab_size=50257): GPTConfig.preset's model."""
        return cls(GPTConfig.preset(name, **overrides))

    # the output layer's (weight, bias) names in named_parameters(): the fused loss (thcore/losses.py) applies it
    # to `features` itself, chunk by chunk; the weight is wte's (tied)
    output_params = ("transformer.wte.weight", None)

    def forward(self, idx, cache: KVCache | None = None):
        """idx: LongTensor [B, T] -> logits [B, T, vocab_size].

        With a `cache` (inference), idx holds the tokens that follow the `cache.pos` cached ones: positions
        start there, and the cache is advanced past them."""
        logits = self.lm_head(self.features(idx, cache))
        # the padded columns are cut off (a view): softmax, loss and sampling see the real tokens only
        V = self.config.vocab_size
        return logits[..., :V] if logits.size(-1) != V else logits

    def features(self, idx, cache: KVCache | None = None):
        """The final LayerNorm's output [B, T, n_embd]: forward without the output layer."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"cannot forward a sequence of length {start + T}: block_size is "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x) if cache is None else block(x, cache, i)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def new_cache(self, batch_size=None, device=None, dtype=None) -> KVCache:
        """An empty KV cache for up to block_size tokens. Its tensors take the shape, device and dtype of the keys
        stored (the arguments, which older callers pass, are not needed)."""
        return KVCache(self.config.n_layer, self.config.block_size)

    def num_params(self, non_embedding=True) -> int:
        """Parameter count (the tied wte/lm_head once); non_embedding leaves out the position embeddings,
        as nanoGPT (the token embeddings stay: they are also the output layer)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n
