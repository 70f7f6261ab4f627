"""Under torchrun: score a translation run's latest checkpoint on its test split with the DDP engine's
reduce_sum (each rank decodes its share of the sentences); rank 0 prints the scores as one JSON line."""
import json
import sys

import attrs

from thcore.engines import make_engine
from thcore.translate import load

task, state, _ = load(sys.argv[1], device="cpu", splits=("test",))
engine = make_engine(attrs.evolve(task.cfg, engine="ddp"))
scores = task.evaluate(state, "test", reduce_sum=engine.reduce_sum, rank=engine.rank,
                       world_size=engine.world_size)
if engine.rank == 0:
    print(json.dumps({**scores, **task.signatures}))
engine.close()
