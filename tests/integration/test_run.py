"""End to end on the eager engine: the run directory, resume (bitwise), corrupt checkpoints, bad input."""
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import DATA, ROOT, th
from helpers import stop_after
from thcore import checkpoint
from thcore.config import ConfigError
from thcore.engines.eager import EagerEngine
from thcore.loop import Interrupted, fit
from thcore.metrics import read_jsonl
from thcore.tasks.translation import TranslationTask


def train(cfg, task=None):
    return fit(cfg, task or TranslationTask(cfg), EagerEngine(cfg))


def tb_scalars(run_dir) -> set:
    """Tags in the TensorBoard event files (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event
    tags = set()
    for path in glob.glob(os.path.join(run_dir, "tb", "events.out.tfevents*")):
        with open(path, "rb") as f:
            data = f.read()
        i = 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = Event.FromString(data[i + 12:i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags


def test_run_directory_layout(tiny):
    cfg = tiny(max_steps=30, eval_every=15)
    state = train(cfg)
    run = cfg.run_dir
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f) == cfg.to_dict()
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    for r in train_rows:
        assert {"step", "split", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [15, 30] and all(0 <= r["exact_match"] <= 1 and r["loss"] > 0 for r in val)
    assert [r["split"] for r in rows].count("test") == 1
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/exact_match"} \
        <= tb_scalars(run)
    ckpts = os.path.join(run, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["latest", "step_15", "step_30"]
    assert open(os.path.join(ckpts, "latest")).read().strip() == "step_30"
    assert sorted(os.listdir(os.path.join(ckpts, "step_30"))) == \
        ["manifest.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    saved = load_file(os.path.join(ckpts, "step_30", "model.safetensors"))
    assert saved.keys() == state.params.keys() and all(torch.equal(saved[k], v) for k, v in state.params.items())
    meta = json.load(open(os.path.join(ckpts, "step_30", "state.json")))
    assert meta["step"] == 30 and meta["seed"] == cfg.seed and meta["data"]["index"] > 0


def test_graceful_stop_then_resume_is_bitwise_equal(tiny, tmp_path):
    # 800 pairs / 16 = 50 batches per epoch: 70 steps cross an epoch boundary
    ref = train(tiny(max_steps=70, checkpoint_every=20, out_dir=str(tmp_path / "ref")))
    cfg = tiny(max_steps=70, checkpoint_every=20, out_dir=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        train(cfg, stop_after(TranslationTask(cfg), 27))
    assert open(os.path.join(cfg.run_dir, "checkpoints", "latest")).read().strip() == "step_27"
    resumed = train(cfg)
    assert resumed.step == 70
    for k in ref.params:
        assert torch.equal(ref.params[k], resumed.params[k]), k
    for k, v in checkpoint.tree.flatten(ref.opt_state).items():
        assert torch.equal(v, checkpoint.tree.flatten(resumed.opt_state)[k]), k
    steps = [r["step"] for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["split"] == "train"]
    assert steps == sorted(set(steps)), "a resumed run must not log a step twice"


def _tiny_args(out, **kw):
    from helpers import TINY
    return [f"--{k}={v}" for k, v in {**TINY, "out_dir": out, **kw}.items()]


def test_kill_9_then_same_command_resumes_bitwise(tmp_path):
    args = ["run", "recipes/single_translation.py"]
    common = dict(max_steps=400, checkpoint_every=25, eval_every=0, demo_train_size=3200)
    th(*args, *_tiny_args(str(tmp_path / "ref"), **common))
    cut = str(tmp_path / "cut")
    p = subprocess.Popen([sys.executable, "th.py", *args, *_tiny_args(cut, **common)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(cut, "checkpoints", "latest")
    deadline = time.time() + 120
    while not os.path.exists(latest) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    th(*args, *_tiny_args(cut, **common))
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "step_400" / "model.safetensors"))
    b = load_file(os.path.join(cut, "checkpoints", "step_400", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _assert_equal(a, b):
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k


def test_corrupt_checkpoints_are_skipped_and_resume_still_matches(tiny, tmp_path, capsys):
    """A bit flip in the newest checkpoint and a truncated file in the one before: both are named and skipped,
    the run resumes from the oldest complete one and still ends bitwise where the uninterrupted run does."""
    ref = train(tiny(max_steps=40, checkpoint_every=10, out_dir=str(tmp_path / "ref")))
    cfg = tiny(max_steps=40, checkpoint_every=10)
    with pytest.raises(Interrupted):
        train(cfg, stop_after(TranslationTask(cfg), 25))
    ckpts = os.path.join(cfg.run_dir, "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["latest", "step_10", "step_20", "step_25"]
    flipped = os.path.join(ckpts, "step_25", "model.safetensors")
    with open(flipped, "r+b") as f:   # flip one byte in the middle of the tensor data
        f.seek(os.path.getsize(flipped) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    truncated = os.path.join(ckpts, "step_20", "optimizer.safetensors")
    os.truncate(truncated, os.path.getsize(truncated) - 100)
    capsys.readouterr()
    _assert_equal(train(cfg), ref)
    err = capsys.readouterr().err
    assert f"{flipped}: checksum mismatch" in err and f"{truncated}: truncated" in err


def test_all_checkpoints_corrupt_refuses_to_start_over(tiny):
    cfg = tiny(max_steps=10, checkpoint_every=10)
    train(cfg)
    os.truncate(os.path.join(cfg.run_dir, "checkpoints", "step_10", "state.json"), 1)
    with pytest.raises(ConfigError, match="none of its 1 checkpoints is complete"):
        train(tiny(max_steps=20, checkpoint_every=10))
    assert os.path.exists(os.path.join(cfg.run_dir, "checkpoints", "step_10", "model.safetensors"))


def test_multi30k_subset_learns(tiny, tmp_path):
    """A few thousand real sentence pairs through --train_src/...: vocabulary, max_len filter, falling loss."""
    src = os.path.join(DATA, "multi30k-en-de")
    files = {}
    for split, n in (("train", 3000), ("valid", 200)):
        for lang in ("en", "de"):
            with open(os.path.join(src, f"{split}.{lang}")) as f:
                lines = [next(f) for _ in range(n)]
            path = tmp_path / f"{split}.{lang}"
            path.write_text("".join(lines))
            files[f"{split}_{'src' if lang == 'en' else 'tgt'}"] = str(path)
    cfg = tiny(**files, min_freq=2, max_len=24, batch_size=32, max_steps=80, eval_every=40, lr=3e-3,
               demo_train_size=1)
    task = TranslationTask(cfg)
    assert 0 < task.data["train"].dropped < 3000 and len(task.data["train"]) + task.data["train"].dropped == 3000
    assert len(task.src_vocab) < len({w for line in open(files["train_src"]) for w in line.split()})
    assert "over max_len dropped" in task.summary
    train(cfg, task)
    rows = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    vals = [r["loss"] for r in rows if r["split"] == "val"]
    assert losses[-1] < losses[0] - 1.0 and vals[-1] < vals[0]


# --- bad input: one line naming the field or file, exit status 2, nothing written ----------------------------

def _bad(tmp_path, *overrides):
    out = tmp_path / "bad"
    p = th("run", "recipes/single_translation.py", f"--out_dir={out}", *overrides, check=False, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert not os.path.exists(out / "config.json")
    return lines[0]


def test_bad_cli_input(tmp_path):
    line = _bad(tmp_path, "--d_modle=64")
    assert "unknown config field 'd_modle'" in line and "did you mean 'd_model'" in line and "num_heads" in line
    assert "d_model=100 must be divisible by num_heads=8" in _bad(tmp_path, "--d_model=100", "--num_heads=8")
    assert "lr=0.0: must be > 0" in _bad(tmp_path, "--lr=0")
    assert "batch_size=-4: must be > 0" in _bad(tmp_path, "--batch_size=-4")
    assert "train_src: file not found: /nonexistent/x.en" in _bad(
        tmp_path, "--train_src=/nonexistent/x.en", "--train_tgt=/nonexistent/x.de")


def test_bad_corpus_files(tiny, tmp_path):
    a, b, empty = tmp_path / "a.en", tmp_path / "b.de", tmp_path / "empty.en"
    a.write_text("one two\nthree\n")
    b.write_text("eins zwei\n")
    empty.write_text("\n\n")
    (tmp_path / "empty.de").write_text("\n\n")
    with pytest.raises(ConfigError, match=rf"train_src/train_tgt: line counts differ: {a} has 2 lines, {b} has 1"):
        TranslationTask(tiny(train_src=str(a), train_tgt=str(b)))
    with pytest.raises(ConfigError, match=rf"train_src: {empty} .* has no non-empty sentence pairs"):
        TranslationTask(tiny(train_src=str(empty), train_tgt=str(tmp_path / "empty.de")))
    with pytest.raises(ConfigError, match="train_tgt: required when train_src is given"):
        tiny(train_src=str(a))
    bad_utf8 = tmp_path / "c.en"
    bad_utf8.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(ConfigError, match=rf"train_src: {bad_utf8}:2: not valid UTF-8"):
        TranslationTask(tiny(train_src=str(bad_utf8), train_tgt=str(a)))
