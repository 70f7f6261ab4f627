"""Scores through the command line: `th.py eval` equals the sacrebleu command line on the output of
`th.py translate`, and two processes under torchrun score a run exactly as one."""
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, SCRIPTS, TINY, free_port, th
from thcore.data import demo


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny translation run on the demo task written out as files, trained long enough that its
    translations score well above zero."""
    tmp = tmp_path_factory.mktemp("bleu")
    data = tmp / "data"
    data.mkdir()
    for split, (src, tgt) in demo.splits(1500, 64, 96, seed=0).items():
        (data / f"{split}.en").write_text("".join(line + "\n" for line in src))
        (data / f"{split}.de").write_text("".join(line + "\n" for line in tgt))
    run = tmp / "run"
    args = {**TINY, "d_model": 64, "d_ff": 128, "max_steps": 300, "eval_every": 0, "log_every": 50}
    th("run", "recipes/single_translation.py", f"--data_dir={data}", f"--out_dir={run}",
       *(f"--{k}={v}" for k, v in args.items() if not k.startswith("demo_")), timeout=900)
    return run, data


def test_eval_equals_the_sacrebleu_command_line_on_translate_output(trained_run, tmp_path):
    run, data = trained_run
    res = json.loads(th("eval", run, "--split=test", "--beam=2", "--device=cpu").stdout)
    out = tmp_path / "hyp.de"
    out.write_text(th("translate", run, f"--input={data / 'test.en'}", "--beam=2", "--device=cpu").stdout)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(data / "test.de"), "-i", str(out), "-m", "bleu",
                          "chrf", "-tok", "13a", "-w", "4", "-f", "json"], capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(cli.stdout)
    assert res["bleu"] > 5   # a model that learned something: the comparison is not between two zeros
    assert res["bleu"] == pytest.approx(bleu["score"], abs=1e-4) and res["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
    assert res["bleu_signature"] == bleu["signature"]
    assert json.load(open(run / "sacrebleu.json"))["bleu_signature"] == bleu["signature"]


def test_two_processes_score_exactly_as_one(trained_run):
    run, _ = trained_run
    one = json.loads(th("eval", run, "--split=test", "--device=cpu").stdout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                        os.path.join(SCRIPTS, "dist_eval.py"), str(run)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout.strip().splitlines()[-1])
    assert one["bleu"] > 5
    for k in ("bleu", "chrf", "loss", "exact_match"):
        assert two[k] == pytest.approx(one[k], abs=1e-4), k
