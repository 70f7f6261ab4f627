"""`th.py bench`: the functional train_step against the same model as a plain nn.Module + torch.optim loop.

Both run the same model, batch, loss, clipping and AdamW in one process, in alternating rounds so that machine
drift hits both alike; the figure to quote is the median ratio.
"""
import statistics
import time

import torch
import torch.nn.functional as F

from .models import Transformer
from .optim import AdamW
from .state import StepOptions, init_state
from .step import IGNORE, train_step


def _batch(batch_size, seq_len, vocab, gen):
    src = torch.randint(4, vocab, (batch_size, seq_len), generator=gen)
    tgt = torch.randint(4, vocab, (batch_size, seq_len + 1), generator=gen)
    return {"src": src, "tgt_in": tgt[:, :-1], "targets": tgt[:, 1:]}


def _module_loop(model, batch, lr, clip):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, foreach=True)

    def step():
        logits = model(batch["src"], batch["tgt_in"])
        t = batch["targets"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), t.flatten(), ignore_index=IGNORE, reduction="sum")
        (loss / (t != IGNORE).sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(d_model=128, num_heads=4, layers=2, d_ff=256, vocab=128, batch_size=64, seq_len=16, steps=20,
         rounds=5, warmup=5, threads=0, compile=False):
    """Median ms/step of each, and functional / module as a ratio (below 1.0: the functional core is faster)."""
    if threads:
        torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    batch = _batch(batch_size, seq_len, vocab, gen)

    def build():
        return Transformer(vocab, vocab, d_model=d_model, num_heads=num_heads, num_encoder_layers=layers,
                           num_decoder_layers=layers, d_ff=d_ff, dropout=0.1)

    state = init_state(build, AdamW(weight_decay=0.01), seed=0, lr=1e-4,
                       options=StepOptions(clip_grad=1.0, compile=compile))
    torch.manual_seed(0)
    model = build()
    module_step = _module_loop(torch.compile(model) if compile else model, batch, 1e-4, 1.0)

    def functional_step():
        nonlocal state
        state, m = train_step(state, batch, donate=True)

    timings = {"functional": [], "module": []}
    for name, fn in (("functional", functional_step), ("module", module_step)):
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in (("functional", functional_step), ("module", module_step)):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            timings[name].append((time.perf_counter() - t0) / steps * 1e3)
    ratios = [a / b for a, b in zip(timings["functional"], timings["module"])]
    tokens = batch_size * seq_len * 2
    print(f"transformer d_model={d_model} layers={layers}+{layers} batch={batch_size}x{seq_len} "
          f"threads={torch.get_num_threads()} compile={compile}")
    for name, ts in timings.items():
        med = statistics.median(ts)
        print(f"  {name:10s} ms/step median {med:7.2f}  min {min(ts):7.2f}  max {max(ts):7.2f}  "
              f"tokens/s {tokens / med * 1e3:9.0f}")
    print(f"  functional/module time ratio: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f})")
    return statistics.median(ratios)
