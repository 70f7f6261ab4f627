"""Model definitions. They know nothing about devices or distribution: training runs them through
`torch.func.functional_call` over a params dict named as in `named_parameters()`. Each family's shape is one
config object (GPTConfig, TransformerConfig) that builds it, round-trips through JSON and counts its FLOPs."""
from .gpt import GPT, GPT_PRESETS, GPTConfig
from .layers import (Attention, DecoderLayer, EncoderLayer, FeedForward, KVCache, MultiHeadAttention,
                     SinusoidalPositionalEncoding, attention, merge_heads, split_heads)
from .transformer import Transformer, TransformerConfig

__all__ = ["GPT", "GPT_PRESETS", "GPTConfig", "Transformer", "TransformerConfig", "Attention", "DecoderLayer",
           "EncoderLayer", "FeedForward", "KVCache", "MultiHeadAttention", "SinusoidalPositionalEncoding",
           "attention", "merge_heads", "split_heads"]
