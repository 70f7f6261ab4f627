"""Decoding with a params pytree: greedy translation for eval."""
import torch

from . import func
from .data.vocab import EOS, PAD


@torch.no_grad()
def greedy(model, params: dict, buffers: dict, src: torch.Tensor, bos: int, max_len: int) -> torch.Tensor:
    """Greedy decoding of a padded `src` batch: target ids [B, <=max_len] (no bos; eos, then PAD)."""
    memory, src_mask = func.apply(model, params, buffers, src, method="encode")
    ys = torch.full((src.size(0), 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for _ in range(max_len):
        logits = func.apply(model, params, buffers, ys, memory, src_mask, method="decode")[:, -1]
        nxt = logits.argmax(-1).masked_fill(done, PAD)
        ys = torch.cat([ys, nxt[:, None]], dim=1)
        done |= nxt == EOS
        if bool(done.all()):
            break
    return ys[:, 1:]


def strip(ids) -> list[int]:
    """Token ids up to (not including) the first eos."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        out.append(i)
    return out
