"""Decoding with a params pytree: greedy and beam search for translation.

The encoder runs once per batch; the decoder runs one position per step over a cache of the earlier positions'
keys/values and of the projected encoder output (models/layers.py:KVCache), so a step costs one token, not the
prefix. Each sentence may emit at most `limit` tokens before eos: `max_len_ratio * source length + 10`, capped
at `max_len`.
"""
import torch

from . import func
from .data.vocab import BOS, EOS, PAD, content_ids


def limits(src: torch.Tensor, max_len: int, max_len_ratio: float = 0.0) -> torch.Tensor:
    """Per-sentence output length limits [B] (eos not counted); ratio 0 = `max_len` for every sentence."""
    n = (src != PAD).sum(1)
    if max_len_ratio <= 0:
        return torch.full_like(n, max_len)
    return (n.float() * max_len_ratio + 10).long().clamp(max=max_len)


def _step(model, params, buffers, ys, memory, src_mask, cache):
    """Log-probabilities [B, V] of the next token; never pad or bos."""
    if cache is None:   # re-decode the whole prefix (the reference the cached path is tested against)
        logits = func.apply(model, params, buffers, ys, memory, src_mask, method="decode")[:, -1]
    else:
        logits = func.apply(model, params, buffers, ys[:, -1:], memory, src_mask, cache, method="decode")[:, -1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    logp[:, PAD] = logp[:, BOS] = float("-inf")
    return logp


@torch.no_grad()
def greedy(model, params: dict, buffers: dict, src: torch.Tensor, bos: int = BOS, max_len: int = 100,
           max_len_ratio: float = 0.0, use_cache: bool = True) -> torch.Tensor:
    """Greedy decoding of a padded `src` batch: target ids [B, <=max_len] (no bos; eos, then PAD)."""
    memory, src_mask = func.apply(model, params, buffers, src, method="encode")
    limit = limits(src, max_len, max_len_ratio)
    cache = model.new_cache() if use_cache else None
    ys = torch.full((src.size(0), 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for t in range(int(limit.max())):
        nxt = _step(model, params, buffers, ys, memory, src_mask, cache).argmax(-1).masked_fill(done, PAD)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= (nxt == EOS) | (limit <= t + 1)
        if bool(done.all()):
            break
    return ys[:, 1:]


@torch.no_grad()
def beam_search(model, params: dict, buffers: dict, src: torch.Tensor, beam: int = 5, max_len: int = 100,
                max_len_ratio: float = 0.0, length_penalty: float = 1.0) -> list[list[int]]:
    """The best hypothesis of each sentence (token ids without bos/eos), by sum of log-probabilities divided by
    length ** length_penalty (length counts eos).

    Each step extends the `beam` live hypotheses of a sentence by every token and keeps the best 2 x beam
    candidates: those ending in eos among the first `beam` are finished, the best `beam` others live on
    (fairseq's rule; with beam 1 this is exactly greedy). A sentence is done with `beam` finished hypotheses;
    at its length limit the live ones are finished as they are."""
    B, K = src.size(0), beam
    memory, src_mask = func.apply(model, params, buffers, src, method="encode")
    limit = limits(src, max_len, max_len_ratio).tolist()
    memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)
    cache = model.new_cache()
    ys = torch.full((B * K, 1), BOS, dtype=torch.long, device=src.device)
    scores = torch.full((B, K), float("-inf"), device=src.device)
    scores[:, 0] = 0.0   # one start per sentence, not K copies of it
    finished = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max(limit)):
        logp = _step(model, params, buffers, ys, memory, src_mask, cache)   # [B*K, V]
        V = logp.size(-1)
        top, idx = (scores.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, dim=1)
        top_l, beam_l, tok_l = top.tolist(), (idx // V).tolist(), (idx % V).tolist()
        rows, toks, new_scores = [], [], []
        for b in range(B):
            keep = []
            if not done[b]:
                for r in range(2 * K):
                    s, k, tok = top_l[b][r], beam_l[b][r], tok_l[b][r]
                    if s == float("-inf"):
                        break
                    if tok == EOS:
                        if r < K:
                            finished[b].append((s / (t + 1) ** length_penalty, ys[b * K + k, 1:].tolist()))
                    elif len(keep) < K:
                        keep.append((s, k, tok))
                if t + 1 >= limit[b]:   # out of length: the live hypotheses end here, without eos
                    finished[b] += [(s / (t + 1) ** length_penalty, ys[b * K + k, 1:].tolist() + [tok])
                                    for s, k, tok in keep]
                done[b] = len(finished[b]) >= K or t + 1 >= limit[b] or not keep
            if done[b]:
                keep = []
            keep += [(float("-inf"), 0, PAD)] * (K - len(keep))   # dead slots: never extended again
            rows += [b * K + k for _, k, _ in keep]
            toks += [tok for _, _, tok in keep]
            new_scores += [s for s, _, _ in keep]
        if all(done):
            break
        index = torch.tensor(rows, device=src.device)
        ys = torch.cat([ys.index_select(0, index), torch.tensor(toks, device=src.device)[:, None]], dim=1)
        cache.reorder(index)
        scores = torch.tensor(new_scores, device=src.device).view(B, K)
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


def translate(model, params, buffers, src: torch.Tensor, beam: int = 1, max_len: int = 100,
              max_len_ratio: float = 0.0, length_penalty: float = 1.0) -> list[list[int]]:
    """Token ids of each sentence's translation (no bos/eos): greedy for beam 1, else beam search."""
    if beam <= 1:
        return [strip(h) for h in greedy(model, params, buffers, src, BOS, max_len, max_len_ratio)]
    return beam_search(model, params, buffers, src, beam, max_len, max_len_ratio, length_penalty)


strip = content_ids   # token ids up to (not including) the first eos, without padding
