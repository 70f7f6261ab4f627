"""Bad input on every launch path: one `error:` line naming the field, file or line, the right exit
status, no traceback; a start that fails leaves the run directory byte for byte as it was; commands that read a
checkpoint name the damaged ones they skip.

Each case runs on the single-process path and under `th.py run` with 2 gloo processes (torchrun). The 2-process
runs share one finished DDP run (module fixture) and stay tiny: torchrun launches dominate this file's time."""
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from helpers import ENV, MULTINODE, ROOT, TEST_RECIPES, TINY, free_port, shakespeare_chars, th
from thcore import checkpoint

SINGLE = os.path.join(ROOT, "recipes", "single_translation.py")
DDP = os.path.join(ROOT, "recipes", "ddp_translation.py")
SMALL = {**TINY, "batch_size": 8, "demo_train_size": 200, "demo_valid_size": 16, "demo_test_size": 8,
         "max_steps": 10, "checkpoint_every": 5, "eval_every": 0, "dist_timeout_s": 120}
TIMEOUT = 300   # seconds per launch: generous on 2 shared cores


def args(out, **kw):
    return [f"--{k}={v}" for k, v in {**SMALL, "out_dir": out, **kw}.items()]


def launch(recipe, out, nproc=1, **kw):
    """`th.py run RECIPE` on one process (eager) or under torchrun with `nproc` gloo processes (DDP)."""
    extra = {"engine": "eager"} if nproc == 1 else {"nproc": nproc}
    return th("run", recipe, *args(out, **{**extra, **kw}), check=False, timeout=TIMEOUT, env=ENV)


def one_error(p, status=2) -> str:
    """The exit status, exactly one `error:` line in stdout + stderr, and no traceback; returns the line."""
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert p.returncode == status and len(errors) == 1, f"exit {p.returncode}\n{out[-4000:]}"
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-4000:]
    return errors[0]


def snapshot(directory) -> dict:
    """{relative path: sha256} of every file and {relative path: None} of every directory under `directory`."""
    out = {}
    for d, dirs, files in os.walk(directory):
        for n in dirs:
            out[os.path.relpath(os.path.join(d, n), directory)] = None
        for n in files:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def flip_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished run of the same tiny model per path: {1: eager, 2: DDP with 2 processes} (checkpoints 5, 10);
    "stdout": what each printed (to a pipe)."""
    root = tmp_path_factory.mktemp("finished")
    done = {"stdout": {}}
    for n, recipe in ((1, SINGLE), (2, DDP)):
        out = str(root / f"nproc{n}")
        p = launch(recipe, out, n)
        assert p.returncode == 0, p.stderr[-4000:]
        done[n], done["stdout"][n] = out, p.stdout
    return done


def corpus(tmp_path, name, src: bytes, tgt: bytes):
    a, b = tmp_path / f"{name}.en", tmp_path / f"{name}.de"
    a.write_bytes(src)
    b.write_bytes(tgt)
    return {"train_src": str(a), "train_tgt": str(b)}


# -- 1. bad data under every launcher: one line naming the file (and line), exit 2 ----------------------------

@pytest.mark.parametrize("nproc", [1, 2])
def test_bad_train_files_give_one_line_and_status_2(tmp_path, nproc):
    recipe = SINGLE if nproc == 1 else DDP
    cases = [(corpus(tmp_path, "utf8", b"fine\n\xff\xfe broken\n", b"gut\nschlecht\n"),
              f"error: train_src: {tmp_path}/utf8.en:2: not valid UTF-8"),
             (corpus(tmp_path, "empty", b"", b""), f"error: train_src: {tmp_path}/empty.en"),
             (corpus(tmp_path, "count", b"one\ntwo\n", b"eins\n"),
              f"error: train_src/train_tgt: line counts differ: {tmp_path}/count.en has 2 lines, "
              f"{tmp_path}/count.de has 1")]
    for files, want in cases:
        out = tmp_path / "run"
        line = one_error(launch(recipe, str(out), nproc, **files))
        assert line.startswith(want), line
        # no file at all (a directory may be created on the way, but nothing a later run or command would read)
        assert not out.exists() or not [k for k, v in snapshot(out).items() if v is not None], snapshot(out)


# -- 2. a failed start leaves the run directory as it was ---------------------------------------------------

@pytest.mark.parametrize("nproc", [1, 2])
def test_failed_starts_leave_every_file_as_it_was(runs, tmp_path, nproc):
    """An incompatible model (--d_model=64 on a d_model=32 run) and an explicit --resume= of a damaged checkpoint
    exit 2 with one line; every file of the run directory is byte for byte what it was, and eval still works."""
    recipe, run = (SINGLE if nproc == 1 else DDP), str(tmp_path / "run")
    shutil.copytree(runs[nproc], run)
    before = snapshot(run)

    line = one_error(launch(recipe, run, nproc, d_model=64))
    assert f"{run}/checkpoints/step_10/model.safetensors: param " in line and "has shape" in line, line
    assert "written by a model with other settings" in line and "resume=never" not in line, line
    assert snapshot(run) == before

    bad = tmp_path / "elsewhere" / "step_5"
    shutil.copytree(os.path.join(run, "checkpoints", "step_5"), bad)
    flip_byte(bad / "model.safetensors")
    p = launch(recipe, run, nproc, resume=str(bad))
    line = one_error(p)
    assert line == f"error: resume={str(bad)!r}: the checkpoint is damaged (see the warnings above); name a " \
                   "complete checkpoint", line
    assert f"warning: skipping checkpoint: {bad}/model.safetensors: checksum mismatch" in p.stderr
    assert snapshot(run) == before

    ev = th("eval", run, "--split=test", "--device=cpu", timeout=TIMEOUT)   # the intact checkpoint still reads
    assert json.loads(ev.stdout)["checkpoint"] == f"{run}/checkpoints/step_10"


def test_a_zero_checkpoint_of_another_model_is_one_line_and_changes_nothing(tmp_path):
    """The same on DeepSpeed ZeRO-2 (2 processes), where DeepSpeed itself loads the shards."""
    pytest.importorskip("deepspeed")
    recipe, run = os.path.join(ROOT, "recipes", "zero2_translation.py"), str(tmp_path / "run")
    done = launch(recipe, run, 2, max_steps=5, demo_valid_size=8, demo_test_size=8)
    assert done.returncode == 0, done.stderr[-4000:]
    before = snapshot(run)
    line = one_error(launch(recipe, run, 2, max_steps=5, d_model=64))
    assert line.startswith(f"error: {run}/checkpoints/step_5: size mismatch for model.") and \
        "written by a model with other settings" in line, line
    assert snapshot(run) == before


def test_every_checkpoint_damaged_is_refused_without_risky_advice(runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs[1], run)
    for step in (5, 10):
        flip_byte(os.path.join(run, "checkpoints", f"step_{step}", "optimizer.safetensors"))
    before = snapshot(run)
    p = launch(SINGLE, run, max_steps=20)
    line = one_error(p)
    assert line.startswith(f"error: {run}/checkpoints: none of its 2 checkpoints is complete (see the warnings "
                           "above): nothing was changed") and "resume=never" not in line, line
    assert p.stderr.count("warning: skipping checkpoint: ") == 2
    assert snapshot(run) == before


# -- 3. a resume from an older checkpoint: TensorBoard reads what metrics.jsonl says; the run records its starts --

@pytest.mark.parametrize("nproc", [1, 2])
def test_resume_from_an_older_checkpoint_keeps_tensorboard_and_records_the_start(runs, tmp_path, nproc):
    from helpers import assert_same_history, jsonl_history
    recipe, run = (SINGLE if nproc == 1 else DDP), str(tmp_path / "run")
    shutil.copytree(runs[nproc], run)
    older = os.path.join(run, "checkpoints", "step_5")
    p = launch(recipe, run, nproc, resume=older)
    assert p.returncode == 0, p.stderr[-4000:]
    assert [s for s, _ in jsonl_history(run)["train/loss"]] == [5, 10]
    assert_same_history(run)
    (note,) = [line for line in p.stdout.splitlines() if line.startswith("config: ")]
    assert note.startswith("config: ") and " fields changed at step 5: " in note, note
    for changed in (f"out_dir {runs[nproc]!r} -> {run!r}", f"resume 'auto' -> {older!r}"):   # the copy moved
        assert changed in note, note
    assert note.endswith("(the previous config.json is kept as config.5.json)"), note
    starts = [json.loads(line) for line in open(os.path.join(run, "launches.jsonl"))]
    assert [(s["step"], s["resumed_from"], s["world_size"]) for s in starts] == [(0, None, nproc), (5, older, nproc)]
    import torch
    for s in starts:   # what th.py was given, whichever process trained
        assert s["recipe"] == recipe and s["command"][1:4] == [os.path.join(ROOT, "th.py"), "run", recipe]
        assert s["versions"]["torch"] == torch.__version__ and s["engine"] == ("eager" if nproc == 1 else "ddp")
        assert "deepspeed" in s["versions"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_log_that_is_not_a_terminal_gets_one_plain_line_per_log_step(runs, nproc):
    import re
    lines = [line for line in runs["stdout"][nproc].splitlines() if line.startswith("step ")]
    pattern = r"step (\d+)/10 \| loss \d+\.\d{4} \| lr \S+ \| grad_norm \S+ \| [\d,]+ tok/s \| .*peak mem \S+ GiB"
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == ["5", "10"], runs["stdout"][nproc]


# -- 4. a recipe that cannot be imported ---------------------------------------------------------------------

# tests/recipes/broken/: each recipe, copied into the test's directory, and the end of the error line it must give
BROKEN = {"syntax.py": ":3: '(' was never closed",
          "imports.py": ":2: ModuleNotFoundError: No module named 'thcore.no_such_module'"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_broken_recipe_is_one_line_naming_file_and_line(tmp_path, nproc):
    for name, want in BROKEN.items():
        shutil.copy(os.path.join(TEST_RECIPES, "broken", name), tmp_path / name)
        line = one_error(th("run", str(tmp_path / name), f"--nproc={nproc}", f"--out_dir={tmp_path / 'run'}",
                            check=False, timeout=TIMEOUT, env=ENV))
        assert line == f"error: recipe {tmp_path / name}{want}", line
    assert not (tmp_path / "run").exists()


def test_torchrun_by_hand_prints_the_cause_first_and_once(tmp_path):
    """`torchrun launchers/multinode.py` started by the user: the workers say it in one line (only one rank does),
    each exits 2; torchrun's own summary follows the cause."""
    shutil.copy(os.path.join(TEST_RECIPES, "broken", "syntax.py"), tmp_path / "syntax.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}", MULTINODE,
                        "--recipe", str(tmp_path / "syntax.py"), f"--out_dir={tmp_path / 'run'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    out = p.stdout + p.stderr
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [f"error: recipe {tmp_path / 'syntax.py'}:3: '(' was never closed"], out[-4000:]
    assert p.returncode != 0 and "exitcode  : 2" in out, out[-4000:]
    if "Traceback" in out:   # torchrun's summary, after the cause
        assert out.index(errors[0]) < out.index("Traceback")


# -- 6. commands that read a checkpoint name the damaged one they skip --------------------------------------

def test_translate_and_eval_skip_a_damaged_newest_checkpoint_with_a_warning(runs, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(runs[1], run)
    flip_byte(os.path.join(run, "checkpoints", "step_10", "model.safetensors"))
    warn = f"warning: skipping checkpoint: {run}/checkpoints/step_10/model.safetensors: checksum mismatch (corrupt)"
    ev = th("eval", run, "--split=test", "--device=cpu", timeout=TIMEOUT)
    assert json.loads(ev.stdout)["checkpoint"] == f"{run}/checkpoints/step_5"
    assert [line for line in ev.stderr.splitlines() if line.startswith("warning:")] == [warn], ev.stderr
    tr = th("translate", run, "--device=cpu", input="drei katzen\n", timeout=TIMEOUT)
    assert warn in tr.stderr and f"loaded {run}/checkpoints/step_5" in tr.stderr and tr.stdout.count("\n") == 1
    # an explicit checkpoint that is damaged is an error, not a fallback
    p = th("eval", run, f"--checkpoint={run}/checkpoints/step_10", "--device=cpu", check=False, timeout=TIMEOUT)
    assert one_error(p) == f"error: {run}/checkpoints/step_10/model.safetensors: checksum mismatch (corrupt)"


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    from thcore.config import from_dict
    from thcore.engines.eager import EagerEngine
    from thcore.loop import fit
    from thcore.tasks.lm import LMConfig, LMTask
    data = shakespeare_chars(tmp_path_factory, 50_000)
    out = tmp_path_factory.mktemp("gpt") / "run"
    cfg = from_dict(LMConfig, {"name": "g", "out_dir": str(out), "data_dir": data, "n_layer": 1, "n_head": 2,
                               "n_embd": 16, "block_size": 16, "dropout": 0.0, "batch_size": 8, "max_steps": 20,
                               "eval_every": 10, "eval_iters": 2, "log_every": 10, "always_save_checkpoint": True})
    fit(cfg, LMTask(cfg), EagerEngine(cfg))
    return str(out)


def test_generate_and_export_skip_a_damaged_newest_checkpoint_with_a_warning(gpt_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(gpt_run, run)
    root = checkpoint.root_of(run)
    assert sorted(os.listdir(root)) == ["latest", "step_10", "step_20"]
    newest = checkpoint.candidates(root)[0]
    # the best checkpoint is recorded by the newest one's state.json: make it the damaged one's own step
    flip_byte(os.path.join(newest, "model.safetensors"))
    warn = f"warning: skipping checkpoint: {newest}/model.safetensors: checksum mismatch (corrupt)"
    g = th("generate", run, "--max_new_tokens=5", "--temperature=0", "--device=cpu", timeout=TIMEOUT)
    warnings = [line for line in g.stderr.splitlines() if line.startswith("warning:")]
    assert warnings and warnings[0] == warn and len(warnings) <= 2, g.stderr
    assert "loaded " in g.stderr and f"loaded {newest}" not in g.stderr and len(g.stdout) == 6
    e = th("export", run, str(tmp_path / "out"), timeout=TIMEOUT)
    assert warn in e.stderr and f"exported {newest}" not in e.stderr, e.stderr
    # 8. the exported weights have the mode of the files beside them (safetensors writes 0600)
    modes = {n: stat.S_IMODE(os.stat(tmp_path / "out" / n).st_mode) for n in os.listdir(tmp_path / "out")}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044 == 0o044, modes
