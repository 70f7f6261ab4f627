"""Under torchrun with 2 gloo processes (tests/unit/test_gpu_readiness.py): one fp16 DDP step where rank 1 alone
gets a non-finite batch, then a good step; each rank prints one JSON line: its loss scale, whether the update was
skipped and the params kept, the scale after the good step and a checksum of the params.

    torchrun --nproc_per_node=2 tests/scripts/ddp_fp16.py host|device
"""
import json
import os
import sys

import torch

from thcore import step as step_mod
from thcore.config import Config
from thcore.engines.ddp import DDPEngine

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/, for helpers
from helpers import probe_batch, probe_state  # noqa: E402

if sys.argv[1] == "device":
    step_mod._host_check_is_free = lambda device: False
torch.set_num_threads(1)
engine = DDPEngine(Config(engine="ddp", device="cpu", dist_timeout_s=60))
state = engine.init(probe_state("fused", precision="fp16"))
before = {k: v.clone() for k, v in state.params.items()}
# rank 1 alone gets an inf: its local loss is inf, rank 0's is finite; the all-reduced gradients overflow
state, m = engine.step(state, [probe_batch(engine.rank, bad=engine.rank == 1)])
out = {"rank": engine.rank, "scale": float(state.loss_scale), "kept": all(torch.equal(before[k], v)
       for k, v in state.params.items()), "skipped": bool(m.get("skipped", False))}
state, m = engine.step(state, [probe_batch(2 + engine.rank)])   # and the next step trains on both
out["scale_after"] = float(state.loss_scale)
out["sum"] = sum(float(v.double().sum()) for v in state.params.values())
sys.stdout.write(json.dumps(out) + chr(10))   # one write: the two ranks share the pipe
sys.stdout.flush()
engine.close()
