"""Sampling from a GPT over a params pytree, with a KV cache (nanoGPT's generate, without recomputing the prefix).

    python th.py generate RUN_DIR --prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 --top_k=200

Each new token costs one position's forward with the cache, against the whole context without it. Once the
context is longer than block_size, the model sees only the last block_size tokens (nanoGPT's crop); their
positions then shift at every step, which a cache cannot reuse, so those steps recompute the window: cached
and uncached sampling give the same tokens at every length.
"""
import sys

import torch

from . import func
from .config import ConfigError
from .data import lm as lm_data
from .interop import hf_gpt2
from .models.gpt import GPT


def _next(logits, temperature: float, top_k: int, gen) -> torch.Tensor:
    """One token id per row of `logits` [B, V]: argmax when temperature is 0, else a top-k sample."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)


@torch.no_grad()
def generate(model: GPT, params: dict, buffers: dict, idx: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """idx [B, T] followed by `max_new_tokens` sampled ids: [B, T + max_new_tokens]."""
    was_training = model.training
    model.eval()
    try:
        block = model.config.block_size
        cache, fed = None, 0   # tokens of idx already in the cache
        for _ in range(max_new_tokens):
            if use_cache and idx.size(1) <= block:
                if cache is None:
                    cache = model.new_cache()
                logits = func.apply(model, params, buffers, idx[:, fed:], cache=cache)
                fed = idx.size(1)
            else:   # uncached, or the window slides past block_size
                logits = func.apply(model, params, buffers, idx[:, -block:])
            nxt = _next(logits[:, -1].float(), temperature, top_k, generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
    finally:
        model.train(was_training)


def load(path: str, checkpoint: str = "", tokenizer_dir: str = "", device: str = "cpu"):
    """(model, params, tokenizer) from a run dir, a checkpoint dir or a Hugging Face GPT-2 dir. The model is
    built on the meta device: its own tensors are never used (functional_call runs it over `params`)."""
    config, params, src = hf_gpt2.load_gpt(path, checkpoint)
    with torch.device("meta"):
        model = config.build()
    params = {k: v.to(device) for k, v in params.items()}
    tok_dir = tokenizer_dir or hf_gpt2.tokenizer_dir_of(hf_gpt2.run_of(path))
    if not tok_dir:
        raise ConfigError(f"tokenizer_dir: required: {path} holds no tokenizer (a directory with vocab.json and "
                          "merges.txt, or a prepared data dir with meta.json)")
    tok = lm_data.load_tokenizer(tok_dir)
    if tok.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer_dir: {tok_dir}: {tok.vocab_size} tokens, the model has {config.vocab_size}")
    print(f"loaded {src} ({sum(p.numel() for p in params.values()):,} parameters)", file=sys.stderr)
    return model, params, tok


def main(path: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 200,
         num_samples: int = 1, seed: int = 1337, checkpoint: str = "", tokenizer_dir: str = "", device: str = "cpu",
         use_cache: bool = True):
    """Print `num_samples` continuations of `prompt` to stdout (only the generated text; messages go to stderr)."""
    if temperature < 0:
        raise ConfigError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if max_new_tokens < 0 or top_k < 0 or num_samples < 1:
        raise ConfigError("max_new_tokens, top_k: must be >= 0; num_samples: must be >= 1")
    model, params, tok = load(path, checkpoint, tokenizer_dir, device)
    start = tok.encode(prompt) if prompt else tok.default_start
    gen = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([start] * num_samples, dtype=torch.long, device=device)
    out = generate(model, params, {}, idx, max_new_tokens, temperature, top_k, gen, use_cache)
    for i, row in enumerate(out[:, len(start):].tolist()):
        if i:
            sys.stdout.write("\n---------------\n")
        sys.stdout.write(tok.decode(row))
    sys.stdout.write("\n")
    sys.stdout.flush()
