"""What a run leaves to read: TensorBoard and metrics.jsonl tell the same history after a resume (read back with
tensorboard's own EventAccumulator), the config history of a resume with changed fields, plain text lines off a
terminal and the bar on one, the Weights & Biases sink (a fake wandb module; W&B's own offline mode under
`th.py run` is a scenario of tests/integration/test_launch.py)."""
import glob
import importlib.machinery
import json
import os
import sys
import types

import pytest

from helpers import TINY, assert_same_history, jsonl_history, th
from thcore import metrics
from thcore.config import ConfigError
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.metrics import read_jsonl
from thcore.tasks.translation import TranslationTask

SMALL = dict(demo_valid_size=8, demo_test_size=8)


def train(cfg):
    return fit(cfg, TranslationTask(cfg), EagerEngine(cfg))


def test_tensorboard_and_metrics_jsonl_agree_after_resuming_from_an_older_checkpoint(tiny, capsys, monkeypatch):
    # both runs open their event file within the same second (tensorboardX names files by the second)
    import tensorboardX.event_file_writer as efw
    monkeypatch.setattr(efw, "time", types.SimpleNamespace(time=lambda: 1796176370.5))
    cfg = tiny(max_steps=40, checkpoint_every=10, log_every=10, eval_every=20, **SMALL)
    train(cfg)
    older = os.path.join(cfg.run_dir, "checkpoints", "step_20")
    train(tiny(max_steps=40, checkpoint_every=10, log_every=10, eval_every=20, resume=older, **SMALL))
    assert [s for s, _ in jsonl_history(cfg.run_dir)["train/loss"]] == [10, 20, 30, 40]
    assert_same_history(cfg.run_dir)
    # the changed field is named, and the config the first 20 steps ran with is kept
    out = capsys.readouterr().out
    assert f"config: 1 field changed at step 20: resume 'auto' -> {older!r} (the previous config.json is kept as " \
           "config.20.json)" in out
    with open(os.path.join(cfg.run_dir, "config.20.json")) as f:
        assert json.load(f) == cfg.to_dict()


def test_a_resume_with_changed_fields_keeps_the_config_history(tiny, capsys):
    first = tiny(max_steps=10, checkpoint_every=10, **SMALL)
    train(first)
    train(first)   # the same config: nothing to keep, nothing said
    assert sorted(n for n in os.listdir(first.run_dir) if n.startswith("config")) == ["config.json"]
    assert "\nconfig: " not in capsys.readouterr().out
    second = tiny(max_steps=20, checkpoint_every=10, lr=1e-3, **SMALL)
    train(second)
    assert "config: 2 fields changed at step 10: lr 0.002 -> 0.001, max_steps 10 -> 20 (the previous config.json " \
           "is kept as config.10.json)" in capsys.readouterr().out
    with open(os.path.join(first.run_dir, "config.10.json")) as f:
        assert json.load(f) == first.to_dict()
    with open(os.path.join(first.run_dir, "config.json")) as f:
        assert json.load(f) == second.to_dict()
    starts = read_jsonl(os.path.join(first.run_dir, "launches.jsonl"))
    assert [(s["step"], s["world_size"], s["engine"]) for s in starts] == [(0, 1, "eager"), (10, 1, "eager"),
                                                                           (10, 1, "eager")]


def test_a_terminal_gets_the_bar_and_no_text_lines(tiny, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    train(tiny(max_steps=10, log_every=5, **SMALL))
    out, err = capsys.readouterr()
    assert "step 5/10 |" not in out and "train: 100%" in err


def test_off_a_terminal_each_log_step_is_one_plain_line(tiny, capsys):
    import re
    train(tiny(max_steps=10, log_every=5, **SMALL))
    out, err = capsys.readouterr()
    pattern = (r"step (\d+)/10 \| loss \d+\.\d{4} \| lr \S+ \| grad_norm \S+ \| [\d,]+ tok/s \| mfu \d+\.\d\d% \| "
               r"peak mem \d+\.\d\d GiB")
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["5", "10"], out
    assert "train:" not in err and "\r" not in err


def test_max_tokens_batches_are_described_in_tokens(tiny, capsys):
    train(tiny(max_steps=2, max_tokens=400, max_len=40, **SMALL))
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("global batch:"))
    assert line.startswith("global batch: 400 x 1 ranks x 1 accum = 400 padded tokens at most |"), line


# -- Weights & Biases ----------------------------------------------------------------------------------------

class FakeWandb(types.ModuleType):
    """Records what the sink calls: wandb.init(**kw) -> run; run.log(values, step=); run.finish()."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, values, step=None):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished += 1


def test_wandb_sink_gets_the_lines_of_metrics_jsonl(tiny, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny(max_steps=10, log_every=5, eval_every=5, wandb_project="th-test", **SMALL)
    train(cfg)
    (init,) = fake.inits
    assert init["project"] == "th-test" and init["name"] == cfg.name and init["dir"] == cfg.run_dir
    assert init["config"]["d_model"] == TINY["d_model"] and init["config"]["start_step"] == 0
    assert fake.finished == 1
    rows = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    assert [step for step, _ in fake.logged] == [r["step"] for r in rows]
    for (step, values), row in zip(fake.logged, rows):
        assert values == {f"{row['split']}/{k}": pytest.approx(v) for k, v in row.items() if k not in ("step", "split")}


def test_wandb_without_the_package_is_one_line_before_any_work(tiny, monkeypatch):
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    cfg = tiny(wandb_project="p")
    with pytest.raises(ConfigError, match=r"wandb_project='p': needs the wandb package: pip install -e '\.\[wandb\]'"):
        train(cfg)
    assert not os.path.exists(cfg.run_dir)
