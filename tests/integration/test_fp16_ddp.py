"""The fp16 loss scale under DDP (torchrun, 2 gloo processes, tests/scripts/ddp_fp16.py): after an overflow on
one rank alone, every rank halves the scale and skips the update, on the host path and on the device path, and
the replicas are still equal after the next step."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, SCRIPTS, free_port


@pytest.mark.parametrize("path", ["host", "device"])
def test_fp16_ddp_ranks_agree_on_the_scale_after_a_local_overflow(tmp_path, path):
    script = os.path.join(SCRIPTS, "ddp_fp16.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), path],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = sorted((json.loads(ln) for ln in p.stdout.splitlines() if ln.startswith("{")), key=lambda r: r["rank"])
    assert len(ranks) == 2
    for r in ranks:   # both halved the scale and skipped the update
        assert r["scale"] == 2.0 ** 15 and r["kept"] and r["skipped"] and r["scale_after"] == 2.0 ** 15
    assert ranks[0]["sum"] == ranks[1]["sum"]   # replicas still equal after the next step
