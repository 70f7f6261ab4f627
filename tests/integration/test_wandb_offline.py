"""`th.py run --wandb_project=...` in W&B's offline mode: the W&B run file is written beside metrics.jsonl and
holds the run's metrics; nothing reaches the network."""
import glob
import os

import pytest

from helpers import ROOT, TINY, th
from thcore.metrics import read_jsonl

SMALL = dict(demo_valid_size=8, demo_test_size=8)


def test_wandb_offline_run_is_written_beside_the_metrics(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    # offline: W&B writes its run file locally; the proxies make any attempt to reach a server fail at once
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path)}
    th("run", os.path.join(ROOT, "recipes", "single_translation.py"), "--wandb_project=th-offline",
       *[f"--{k}={v}" for k, v in {**TINY, **SMALL, "max_steps": 10, "out_dir": str(out)}.items()],
       env=env, timeout=300)
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    with open(run_file, "rb") as f:
        data = f.read()
    assert b"train/loss" in data and b"th-offline" in data
    assert len([r for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]) == 2
