"""Model definitions. They know nothing about devices or distribution: training runs them through
`torch.func.functional_call` over a params dict named as in `named_parameters()`."""
from .gpt import GPT, GPT_PRESETS
from .layers import (DecoderLayer, EncoderLayer, FeedForward, MultiHeadAttention, SinusoidalPositionalEncoding,
                     attention, merge_heads, split_heads)
from .transformer import Transformer

__all__ = ["GPT", "GPT_PRESETS", "Transformer", "DecoderLayer", "EncoderLayer", "FeedForward", "MultiHeadAttention",
           "SinusoidalPositionalEncoding", "attention", "merge_heads", "split_heads"]
