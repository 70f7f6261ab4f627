"""Checkpoints written in the background (`async_checkpoint`): the caller waits only for a host copy of the state,
the files hold the state as it was at `save` even when training changes it meanwhile, a failed write is raised
at the next save or wait, and a fit that saves this way writes and resumes the same checkpoints."""
import json
import os
import threading

import pytest
import torch

from thcore import checkpoint
from thcore.models import GPT
from thcore.state import init_state


def tiny():
    return init_state(lambda: GPT(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)


def test_save_returns_before_the_write_and_the_files_hold_the_state_at_save(tmp_path, monkeypatch):
    state, run = tiny(), str(tmp_path)
    before = {k: v.clone() for k, v in state.params.items()}
    release, write_dir = threading.Event(), checkpoint.write_dir

    def held(*args, **kw):   # the background write waits until the test has changed the state
        assert release.wait(60)
        return write_dir(*args, **kw)
    monkeypatch.setattr(checkpoint, "write_dir", held)
    saver = checkpoint.Saver(background=True)
    path = saver.save(state, run, extra={"best": 1.5})
    assert path == checkpoint.step_dir(run, 0) and not os.path.exists(path)   # returned, nothing written yet
    with torch.no_grad():
        for v in state.params.values():   # what the next training step does: in place
            v.add_(1.0)
    release.set()
    saver.wait()
    checkpoint.verify(path)   # the manifest's sizes and checksums hold
    assert checkpoint.pick(run, "latest") == path
    saved = checkpoint.read_params(path)
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in before)
    assert json.load(open(os.path.join(path, "state.json")))["best"] == 1.5


def test_the_next_save_reuses_the_host_buffers_and_prunes(tmp_path):
    state, run, saver = tiny(), str(tmp_path), checkpoint.Saver(background=True)
    for step in (1, 2, 3):
        state = state.replace(step=step)
        with torch.no_grad():
            state.params["transformer.wte.weight"].fill_(step)
        saver.save(state, run, keep=2)
    saver.wait()
    assert [os.path.basename(c) for c in checkpoint.candidates(checkpoint.root_of(run))] == ["step_3", "step_2"]
    for step in (2, 3):
        w = checkpoint.read_params(checkpoint.step_dir(run, step))["transformer.wte.weight"]
        assert torch.all(w == step), step


def test_a_failed_write_is_raised_at_the_next_wait_and_the_saver_goes_on(tmp_path, monkeypatch):
    state, run, saver = tiny(), str(tmp_path), checkpoint.Saver(background=True)
    write_dir = checkpoint.write_dir

    def full(final, *args, **kw):
        raise checkpoint.CheckpointError(f"could not write checkpoint {final}: No space left on device")
    monkeypatch.setattr(checkpoint, "write_dir", full)
    saver.save(state, run)
    with pytest.raises(checkpoint.CheckpointError, match="step_0: No space left on device"):
        saver.wait()
    saver.wait()   # raised once
    monkeypatch.setattr(checkpoint, "write_dir", write_dir)
    path = saver.save(state.replace(step=1), run)
    saver.wait()
    checkpoint.verify(path)
