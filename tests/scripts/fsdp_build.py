"""A torchrun worker (tests/integration/test_fsdp.py): build a GPT on the meta device and shard it with the FSDP engine,
measuring this rank's peak host memory, then check the shards against the model built whole.

    torchrun --nproc_per_node=N tests/scripts/fsdp_build.py OUT_DIR

Writes OUT_DIR/rank<r>.json: {"whole_mb", "shard_mb", "build_peak_mb", "whole_peak_mb", "equal"}. Peaks are the
growth of the process's resident set (VmHWM, reset through /proc/self/clear_refs) over what it held before."""
import json
import os
import sys

import torch

from thcore import init_state
from thcore.engines.fsdp import FSDPEngine
from thcore.models.gpt import GPT
from thcore.optim import SGD
from thcore.recipe import configure
from thcore.weights import build

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/scripts/ -> the repo
# 8 blocks of width 768 and an uneven vocabulary (8191 rows do not split evenly over the ranks): 63M fp32 params
SHAPE = dict(vocab_size=8191, block_size=256, n_layer=8, n_head=12, n_embd=768)


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_growth_mb(fn):
    """(fn(), MB by which the resident set peaked above its size before fn)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")   # reset VmHWM to the current resident set
    before = _kb("VmRSS")
    out = fn()
    return out, (_kb("VmHWM") - before) / 1024


def main(out: str):
    cfg, _ = configure(os.path.join(ROOT, "recipes", "gpt2_shakespeare_char_cpu.py"),
                       {"engine": "fsdp", "device": "cpu", "out_dir": out, **SHAPE})
    engine = FSDPEngine(cfg)
    # the first build imports and sets up what every build needs (FSDP, DTensor): paid once, with a tiny model
    engine.init(init_state(lambda: GPT(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8), SGD(momentum=0.0),
                           device="meta"))
    model_fn = lambda: GPT(**SHAPE)   # noqa: E731
    # no momentum: the optimizer holds nothing, so the peak is the build's and the sharding's alone
    state, build_peak = peak_growth_mb(lambda: engine.init(init_state(model_fn, SGD(momentum=0.0), seed=7, device="meta")))
    shard = sum(p.to_local().numel() * p.element_size() for p in state.params.values()) / 2 ** 20
    (_, whole, _), whole_peak = peak_growth_mb(lambda: build(model_fn, 7, "cpu"))
    equal = all(torch.equal(state.params[k].full_tensor(), whole[k]) for k in whole)   # a collective per param
    with open(os.path.join(out, f"rank{engine.rank}.json"), "w") as f:
        json.dump({"whole_mb": sum(t.numel() * t.element_size() for t in whole.values()) / 2 ** 20,
                   "shard_mb": shard, "build_peak_mb": build_peak, "whole_peak_mb": whole_peak,
                   "equal": equal, "names": sorted(state.params) == sorted(whole)}, f)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1])
