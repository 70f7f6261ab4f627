"""The fit loop's parts: a part written outside thcore (its own cadence, its own state in state.json) resumes
exactly as the run that never stopped; the step iterator crosses epochs and resumes from the data cursor."""
import json
import os
import types

import pytest
import torch

from helpers import tiny_config
from helpers import stop_after
from thcore.data.loader import step_batches
from thcore.engines.eager import EagerEngine
from thcore.loop import Interrupted, fit
from thcore.metrics import read_jsonl
from thcore.parts import Part
from thcore.tasks.translation import TranslationTask

RUN = dict(max_steps=30, checkpoint_every=10, demo_valid_size=8, demo_test_size=8)


class EverySeven(Part):
    """Every 7 steps, a "seven" line with the steps seen and the sum of their training losses; both counters are
    carried across resumes in state.json."""

    def start(self, run):
        self.steps, self.loss = run.meta.get("seven_steps", 0), run.meta.get("seven_loss", 0.0)

    def after_step(self, run, answers):
        self.steps += 1
        self.loss += float(run.out["loss_sum"])   # a host read per step: fine for a test, not for a GPU run
        if run.step % 7 == 0:
            run.metrics.log(run.step, "seven", steps=self.steps, loss=self.loss)

    def state_dict(self):
        return {"seven_steps": self.steps, "seven_loss": self.loss}


def _sevens(run_dir):
    return [{k: v for k, v in r.items() if k != "time_s"}
            for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["split"] == "seven"]


def test_a_custom_part_resumes_exactly(tmp_path):
    ref_cfg = tiny_config(tmp_path / "ref", **RUN)
    ref = fit(ref_cfg, TranslationTask(ref_cfg), EagerEngine(ref_cfg), parts=[EverySeven()])
    cfg = tiny_config(tmp_path / "cut", **RUN)
    with pytest.raises(Interrupted):
        fit(cfg, stop_after(TranslationTask(cfg), 12), EagerEngine(cfg), parts=[EverySeven()])
    assert [r["step"] for r in _sevens(cfg.run_dir)] == [7]
    meta = json.load(open(os.path.join(cfg.run_dir, "checkpoints", "step_12", "state.json")))
    assert meta["seven_steps"] == 12
    resumed = fit(cfg, TranslationTask(cfg), EagerEngine(cfg), parts=[EverySeven()])
    assert resumed.step == ref.step == 30
    assert [r["step"] for r in _sevens(ref_cfg.run_dir)] == [7, 14, 21, 28]
    assert _sevens(cfg.run_dir) == _sevens(ref_cfg.run_dir)   # the counters went on where they stopped, bitwise
    last = json.load(open(os.path.join(cfg.run_dir, "checkpoints", "step_30", "state.json")))
    assert last["seven_steps"] == 30


def test_tokens_per_s_counts_the_time_spent_training_only(tmp_path, monkeypatch):
    """A clock that advances 1 s per step and 100 s per evaluation: each train line's tokens/s is its window's
    tokens over 5 s (its 5 steps), whatever the evaluation before it took."""
    import thcore.parts
    clock, window = [0.0], []
    monkeypatch.setattr(thcore.parts, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                                    monotonic=lambda: clock[0]))

    class OneSecondSteps(EagerEngine):
        def step(self, state, batch):
            clock[0] += 1.0
            state, m = super().step(state, batch)
            window.append(int(m["ntokens"]))
            return state, m

    class SlowEval(TranslationTask):
        def evaluate(self, *a, **k):
            clock[0] += 100.0
            return super().evaluate(*a, **k)
    cfg = tiny_config(tmp_path, max_steps=10, eval_every=5, log_every=5, demo_valid_size=8, demo_test_size=8)
    fit(cfg, SlowEval(cfg), OneSecondSteps(cfg))
    rows = [r for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [5, 10]
    assert [r["tokens_per_s"] for r in rows] == [pytest.approx(sum(window[:5]) / 5), pytest.approx(sum(window[5:]) / 5)]


class Counting:
    """A task whose batch b of epoch e is {"x": [e, b]}; 5 micro-batches per epoch."""

    def batches_per_epoch(self, world):
        return 5

    def train_loader(self, epoch, start, engine):
        return ({"x": torch.tensor([epoch, b])} for b in range(start, 5))


def _take(cursor, n, grad_accum=2):
    it = step_batches(Counting(), types.SimpleNamespace(world_size=1, rank=0, device="cpu"), grad_accum, cursor)
    return [next(it) for _ in range(n)]


def test_step_batches_cross_epochs_and_resume_from_the_cursor():
    steps = _take({"epoch": 0, "index": 0}, 5)
    # 2 steps of 2 micro-batches per epoch; the fifth micro-batch of each epoch fills no step and is left out
    assert [[mb["x"].tolist() for mb in s.micro] for s in steps] == [
        [[0, 0], [0, 1]], [[0, 2], [0, 3]], [[1, 0], [1, 1]], [[1, 2], [1, 3]], [[2, 0], [2, 1]]]
    assert [s.after for s in steps] == [{"epoch": 0, "index": 2}, {"epoch": 1, "index": 0},
                                         {"epoch": 1, "index": 2}, {"epoch": 2, "index": 0},
                                         {"epoch": 2, "index": 2}]
    assert [s.epoch_end for s in steps] == [False, True, False, True, False]
    assert [s.before for s in steps[1:]] == [s.after for s in steps[:-1]]
    resumed = _take(steps[2].after, 2)   # from a checkpoint's cursor: the same steps as the run that went on
    assert [[mb["x"].tolist() for mb in s.micro] for s in resumed] == \
        [[mb["x"].tolist() for mb in s.micro] for s in steps[3:5]]
