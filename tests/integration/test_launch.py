"""Launch scenarios, as a user types them: `python th.py run RECIPE --field=value ... [--nproc=N]` from the repo
root, one row of SCENARIOS each: the recipe, its overrides, the processes, and what must come of it (the exit
status, then a check of what the run printed and left in its run directory; a check may also run the commands that
read the run: `th.py eval`, `th.py translate`). test_launch runs every row the same way.

A new end-to-end case that is one launch and a look at its outcome is a new row. Tests that need more than that
stay with their topic: faults injected mid-run, signals and restarts (test_faults.py), runs compared with each
other or with an in-process reference (test_ddp.py, test_fsdp.py, test_deepspeed.py), damaged run directories
(test_launch_errors.py)."""
import dataclasses
import importlib.util
import json
import os
from typing import Callable, Optional

import pytest
import torch

from helpers import RUN, TIMEOUT, TINY, multi30k_dir, rows, th
from thcore.data import translation as tdata
from thcore.metrics import read_jsonl

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}   # small models and 2 ranks: one thread each on 2 busy cores
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed: pip install deepspeed")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")]


@dataclasses.dataclass(frozen=True)
class Expect:
    """What must come of a launch: its exit status, then check(p, out, tmp_path) on the CompletedProcess and the
    run directory (out_dir)."""
    status: int = 0
    check: Callable = lambda p, out, tmp_path: None


@dataclasses.dataclass(frozen=True)
class Scenario:
    id: str
    recipe: str                    # a path from the repo root, as a user gives it
    overrides: dict                # --field=value for each item (out_dir is added: tmp_path / out)
    nproc: Optional[int]           # --nproc=N; None: no flag (the recipe's own count, or one process per GPU)
    expect: Expect
    data: Optional[Callable] = None   # data(tmp_path) -> more overrides (files the run reads, made per test)
    env: Optional[Callable] = None    # env(tmp_path) -> the environment of th.py; None: this process's
    out: str = "run"               # the run directory, under tmp_path ("": tmp_path itself)
    timeout: int = 300             # seconds for the launch
    marks: tuple = ()


# -- the checks: each holds the assertions of the test its row was --------------------------------------------

def demo_reaches_its_bar(p, out, tmp_path):
    """The README's demo, exactly as a user runs it: it must reach its bar (held-out exact match >= 0.90)."""
    assert "parameters" in p.stdout and "vocab src" in p.stdout and "global batch" in p.stdout
    # eval lines, and (output to a pipe, not a terminal) one plain line per log step instead of a progress bar
    assert "eval val step 1000" in p.stdout and "step 1000/1000 | loss" in p.stdout and "tok/s" in p.stdout
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    final = [r for r in rows if r["split"] == "val"][-1]
    test = [r for r in rows if r["split"] == "test"][-1]
    assert final["step"] == 1000 and final["exact_match"] >= 0.90, final
    assert test["exact_match"] >= 0.90, test


def wandb_offline_run_is_written_beside_the_metrics(p, out, tmp_path):
    """W&B's offline mode: its run file lies beside metrics.jsonl and holds the run's metrics; the proxies make
    any attempt to reach a server fail at once."""
    import glob
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    with open(run_file, "rb") as f:
        data = f.read()
    assert b"train/loss" in data and b"th-offline" in data
    assert len([r for r in read_jsonl(str(out / "metrics.jsonl")) if r["split"] == "train"]) == 2


def multi30k_run_improves_bleu_then_eval_and_translate(p, run, tmp_path):
    """The recipe (made small) on 3000 Multi30k pairs: BLEU and chrF in the eval lines rise, the test split is
    scored at the end with beam search, `th.py eval` reproduces it from the checkpoint and `th.py translate`
    prints one line per input line."""
    rows = read_jsonl(str(run / "metrics.jsonl"))
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [100, 200, 300]
    # measured: bleu 0.3 -> 2.0, chrf 10 -> 17.5
    assert val[-1]["bleu"] > val[0]["bleu"] + 1 and val[-1]["chrf"] > val[0]["chrf"] + 5
    (test,) = [r for r in rows if r["split"] == "test"]
    assert {"loss", "bleu", "chrf", "exact_match"} <= set(test)
    assert os.path.isfile(run / "vocab.joint.json")
    out = json.loads(th("eval", str(run), "--split=test", env=ONE_THREAD).stdout)
    assert out["beam"] == 3 and out["sentences"] == 60 and out["bleu"] == pytest.approx(test["bleu"], abs=1e-3)
    inp = tmp_path / "in.en"
    inp.write_text("A man is riding a bike.\n\nTwo dogs play in the snow.\n")
    p = th("translate", str(run), f"--input={inp}", "--beam=2", env=ONE_THREAD)
    lines = p.stdout.split("\n")
    assert len(lines) == 4 and lines[1] == "" and lines[0] and lines[2] and lines[3] == ""
    greedy = th("translate", str(run), "--beam=1", input="A man is riding a bike.\n", env=ONE_THREAD).stdout
    assert len(greedy.splitlines()) == 1 and greedy.strip()


def two_ranks_one_prepares_the_other_waits(p, run, tmp_path):
    """A DDP run from raw files: rank 0 prepares into the run directory, rank 1 waits and reads it."""
    meta = tdata.read_meta(str(run / "prepared"))
    assert meta["splits"]["train"]["pairs"] == 600 and os.path.isfile(run / "vocab.joint.json")
    assert [r["step"] for r in read_jsonl(str(run / "metrics.jsonl")) if r["split"] == "train"] == [2, 4]


def th_run_starts_the_processes(p, out, tmp_path):
    """`python th.py run recipes/zero3_translation.py`: th.py starts torchrun with the recipe's 2 processes."""
    log = p.stdout + p.stderr
    assert "engine deepspeed on cpu x 2" in log and '"overlap_comm": false, "stage": 3}' in log   # CPU: no streams
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3]
    assert open(out / "checkpoints" / "latest").read().strip() == "step_3"
    assert os.path.isfile(out / "checkpoints" / "step_3" / "global_step3" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def nccl_on_gpus_trains_in_bf16(p, out, tmp_path):
    """The DDP recipe on every GPU of the machine (NCCL), bf16 with bf16-compressed gradients: the loss falls."""
    n = torch.cuda.device_count()
    assert f"x {n} ranks" in p.stdout + p.stderr and "engine ddp on cuda:0" in p.stdout + p.stderr
    losses = [r["loss"] for r in rows(str(tmp_path), "train")]
    assert losses[-1] < losses[0]


# -- the scenarios ---------------------------------------------------------------------------------------------

MULTI30K_SMALL = dict(d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=256, dropout=0.1,
                      vocab_size=1000, max_tokens=1200, max_len=64, lr=5e-3, warmup_steps=30, max_minutes=0,
                      max_steps=300, eval_every=100, log_every=20, test_beam=3, eval_batch_size=100, engine="eager",
                      nproc=1)
# the DeepSpeed runs' tiny model (TWO in tests/integration/test_deepspeed.py): dropout 0, 8 sentences per rank
DEEPSPEED_TWO = {**TINY, "log_every": 1, "max_len": 24, "demo_valid_size": 33, "demo_test_size": 8,
                 "lr_schedule": "constant", "dropout": 0.0, "batch_size": 8, "eval_batch_size": 8}


def wandb_offline_env(tmp_path):
    # offline: W&B writes its run file locally; the proxies make any attempt to reach a server fail at once
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HTTPS_PROXY": "http://127.0.0.1:9",
            "HTTP_PROXY": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path)}


SCENARIOS = [
    Scenario("demo_reaches_its_bar", "recipes/single_translation.py", {}, None, Expect(0, demo_reaches_its_bar),
             out="demo", timeout=1200),
    Scenario("wandb_offline_run_is_written_beside_the_metrics", "recipes/single_translation.py",
             {"wandb_project": "th-offline", **TINY, "demo_valid_size": 8, "demo_test_size": 8, "max_steps": 10},
             None, Expect(0, wandb_offline_run_is_written_beside_the_metrics), env=wandb_offline_env,
             marks=(needs_wandb,)),
    Scenario("multi30k_run_improves_bleu_then_eval_and_translate", "recipes/multi30k_en_de.py", MULTI30K_SMALL,
             None, Expect(0, multi30k_run_improves_bleu_then_eval_and_translate),   # --nproc=1 is in the overrides
             data=lambda tmp_path: {"data_dir": multi30k_dir(tmp_path, 3000, 100, 60)},
             env=lambda tmp_path: ONE_THREAD, timeout=600),
    Scenario("two_ranks_one_prepares_the_other_waits", "recipes/multi30k_en_de.py",
             {"engine": "ddp", "d_model": 32, "num_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
              "d_ff": 64, "vocab_size": 500, "max_steps": 4, "max_minutes": 0, "eval_every": 1000, "log_every": 2,
              "test_beam": 1}, 2, Expect(0, two_ranks_one_prepares_the_other_waits),
             data=lambda tmp_path: {"data_dir": multi30k_dir(tmp_path, 600, 20, 20)},
             env=lambda tmp_path: ONE_THREAD, timeout=600),
    Scenario("th_run_starts_the_processes", "recipes/zero3_translation.py", {**DEEPSPEED_TWO, "max_steps": 3}, None,
             Expect(0, th_run_starts_the_processes), env=lambda tmp_path: ONE_THREAD, timeout=1500,
             marks=(needs_deepspeed,)),
    Scenario("nccl_on_gpus_trains_in_bf16", "recipes/ddp_translation.py",
             {**RUN, "precision": "bf16", "ddp_comm_hook": "bf16_compress"}, None,
             Expect(0, nccl_on_gpus_trains_in_bf16), out="", timeout=TIMEOUT, marks=tuple(needs_cuda)),
]


@pytest.mark.parametrize("s", [pytest.param(s, id=s.id, marks=s.marks) for s in SCENARIOS])
def test_launch(s, tmp_path):
    out = tmp_path / s.out if s.out else tmp_path
    overrides = {**s.overrides, **(s.data(tmp_path) if s.data else {}), "out_dir": out}
    nproc = [] if s.nproc is None else [f"--nproc={s.nproc}"]
    kw = {} if s.env is None else {"env": s.env(tmp_path)}
    p = th("run", s.recipe, *nproc, *(f"--{k}={v}" for k, v in overrides.items()), timeout=s.timeout,
           check=False, **kw)
    assert p.returncode == s.expect.status, f"th.py run {s.recipe} exited {p.returncode}\n{p.stdout}\n{p.stderr}"
    s.expect.check(p, out, tmp_path)
