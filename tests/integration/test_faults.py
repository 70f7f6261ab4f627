"""Fault tolerance (the table is docs/RELIABILITY.md): each fault is injected for real, then what it
left behind is checked.

CPU, gloo, bounded time: multi-process runs use tests/helpers.py's tiny DDP config (RUN) with a short collective
timeout; faults come from tests/recipes/fault_recipe.py (environment variables). Crashes during a save run in forked
children, so no child re-imports torch."""
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
import types

import attrs
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from helpers import ENV, MULTINODE, ROOT, RUN, TEST_RECIPES, TIMEOUT, free_port, poisoned, run_args, th
from thcore import checkpoint, faults
from thcore import step as step_mod
from thcore.checkpoint import CheckpointError
from thcore.cli import guarded
from thcore.config import ConfigError, from_dict
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.metrics import read_jsonl
from thcore.optim import AdamW
from thcore.recipe import configure
from thcore.state import StepOptions, init_state
from thcore.step import train_step
from thcore.tasks.translation import TranslationConfig, TranslationTask

RECIPE = os.path.join(TEST_RECIPES, "fault_recipe.py")
SMALL_EVAL = dict(demo_valid_size=8, demo_test_size=8)   # the final evals decode: keep them short


def trees_equal(a, b) -> bool:
    la, lb = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def train_rows(run):
    return [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["split"] == "train"]


# -- non-finite steps ---------------------------------------------------------------------------------------

class Probe(nn.Module):
    """A classifier over float features: a batch with an infinite feature gives an infinite loss and NaN grads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x)


def probe_state(**options):
    return init_state(Probe, AdamW(weight_decay=0.1), seed=0, lr=1e-2, options=StepOptions(**options))


def probe_batch(bad=False):
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(8, 4, generator=g), "targets": torch.randint(0, 3, (8,), generator=g)}
    if bad:
        batch["x"][3, 1] = float("inf")
    return batch


@pytest.mark.parametrize("select_on_device", [False, True], ids=["host-check", "device-select"])
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_a_nonfinite_step_leaves_the_state_unchanged(monkeypatch, select_on_device, donate):
    """Params, optimizer state (moments and Adam's step counts) and the EMA are the ones before the bad batch; the
    step counter moves on. `device-select` forces the path accelerators take (Flax's select, no host sync)."""
    if select_on_device:
        monkeypatch.setattr(step_mod, "_host_check_is_free", lambda device: False)
    state, _ = train_step(probe_state(ema_decay=0.9), probe_batch())   # moments and EMA away from their init
    before = state.clone()
    new, m = train_step(state, probe_batch(bad=True), donate=donate)
    assert bool(m["nonfinite"]) and not torch.isfinite(m["loss_sum"]) and new.step == before.step + 1
    assert trees_equal(new.params, before.params) and trees_equal(new.opt_state, before.opt_state)
    assert trees_equal(new.ema, before.ema)
    # and the next good step is the one the state would have taken without the bad batch (at the next lr)
    after, m = train_step(new, probe_batch())
    ref, _ = train_step(before.replace(step=before.step + 1), probe_batch())
    assert not bool(m["nonfinite"]) and trees_equal(after.params, ref.params)
    assert trees_equal(after.opt_state, ref.opt_state)


def test_fp16_overflow_is_the_loss_scales_business_not_a_nan():
    state = probe_state(precision="fp16").replace(loss_scale=1e38)   # scaled gradients overflow fp16
    new, m = train_step(state, probe_batch())
    assert m.get("skipped") == 1 and not bool(m["nonfinite"]) and new.loss_scale == 5e37
    assert trees_equal(new.params, state.params)
    # a non-finite *loss* is no overflow: counted as non-finite, and the loss scale is left alone
    new, m = train_step(state.replace(loss_scale=1024.0), probe_batch(bad=True))
    assert bool(m["nonfinite"]) and "skipped" not in m and new.loss_scale == 1024.0
    assert trees_equal(new.params, state.params)


def poison_at(task, step):
    """The training batch of `step` (counted from 1, first epoch) gets the key fault_recipe.poisoned reacts to."""
    orig = task.train_loader

    def loader(epoch, start, engine):
        for i, b in enumerate(orig(epoch, start, engine)):
            yield {**b, "poison": torch.ones(())} if epoch == 0 and start + i + 1 == step else b
    task.train_loader = loader
    return task


def test_skip_policy_counts_the_step_and_keeps_the_logged_loss_finite(tiny, monkeypatch):
    monkeypatch.setattr(step_mod, "loss_fn", poisoned(step_mod.loss_fn))
    cfg = tiny(max_steps=10, log_every=5, **SMALL_EVAL)
    state = fit(cfg, poison_at(TranslationTask(cfg), 3), EagerEngine(cfg))
    rows = train_rows(cfg.run_dir)
    assert [(r["step"], r["nonfinite_steps"]) for r in rows] == [(5, 1.0), (10, 0.0)]
    assert all(r["loss"] is not None and 0 < r["loss"] < 100 for r in rows)
    assert state.step == 10 and all(torch.isfinite(p).all() for p in state.params.values())


def test_stop_policy_saves_the_last_good_state_and_exits_naming_the_step(tmp_path):
    """`th.py run ... --nan_policy=stop`: exit status 3, one line naming step 7, and checkpoints/step_6 is bitwise
    the step-6 checkpoint of a run that never saw the bad batch."""
    cut, ref = str(tmp_path / "cut"), str(tmp_path / "ref")
    p = th("run", RECIPE, *run_args(cut, engine="eager", nan_policy="stop", checkpoint_every=4, max_steps=12),
           env={**ENV, "TH_FAULT_NAN_STEP": "7"}, check=False, timeout=TIMEOUT)
    assert p.returncode == 3, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 7: non-finite loss or gradients") and "nan_policy='stop'" in last, last
    assert f"saved the last good state (step 6) as {cut}/checkpoints/step_6" in last, last
    root = checkpoint.root_of(cut)
    assert sorted(os.listdir(root)) == ["latest", "step_4", "step_6"] and checkpoint.candidates(root)[0].endswith("6")

    cfg, mod = configure(os.path.join(ROOT, "recipes", "ddp_translation.py"),
                         {**RUN, "engine": "eager", "out_dir": ref, "checkpoint_every": 3, "max_steps": 12})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # as the run above (OMP_NUM_THREADS=1): the same kernels, so the same bits
    try:
        fit(cfg, mod.build(cfg), EagerEngine(cfg))
    finally:
        torch.set_num_threads(threads)
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(r, "checkpoints", "step_6", name)) for r in (cut, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- out of memory ------------------------------------------------------------------------------------------

OOMS = {"cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.10 GiB total)"),
        "host": RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                             "memory: you tried to allocate 85899345920 bytes. Error code 12")}


@pytest.mark.parametrize("kind", OOMS)
def test_out_of_memory_names_the_step_and_the_remedies_and_keeps_the_checkpoint(tiny, kind):
    cfg = tiny(max_steps=12, checkpoint_every=5, **SMALL_EVAL)

    class OutOfMemory(EagerEngine):
        def step(self, state, batch):
            if state.step + 1 == 8:
                raise OOMS[kind]
            return super().step(state, batch)
    with pytest.raises(faults.TrainingAborted) as e:
        fit(cfg, TranslationTask(cfg), OutOfMemory(cfg))
    msg, root = str(e.value), checkpoint.root_of(cfg.run_dir)
    assert "\n" not in msg and msg.startswith("out of memory in step 8 (")
    remedies = ["--batch_size=8 --grad_accum=2", "--activation_checkpointing=True", "--zero_stage", "--offload=cpu"]
    assert [msg.index(r) for r in remedies] == sorted(msg.index(r) for r in remedies), msg
    assert f"intact ({root}/step_5)" in msg
    checkpoint.verify(os.path.join(root, "step_5"))
    assert sorted(os.listdir(root)) == ["latest", "step_5"]
    if kind == "cuda":
        state = fit(cfg, TranslationTask(cfg), EagerEngine(cfg))   # the same command resumes from it
        assert state.step == 12


def test_checkpoint_every_s_saves_by_the_clock(tiny, monkeypatch):
    """A fake clock that advances 1 s per step: checkpoint_every_s=3 saves at steps 3, 6, 9 (and the last)."""
    import thcore.parts
    clock = [0.0]
    monkeypatch.setattr(thcore.parts.time, "monotonic", lambda: clock[0])

    class OneSecondSteps(EagerEngine):
        def step(self, state, batch):
            clock[0] += 1.0
            return super().step(state, batch)
    cfg = tiny(max_steps=10, checkpoint_every_s=3, keep_checkpoints=10, **SMALL_EVAL)
    fit(cfg, TranslationTask(cfg), OneSecondSteps(cfg))
    assert sorted(os.listdir(checkpoint.root_of(cfg.run_dir))) == ["latest", "step_10", "step_3", "step_6", "step_9"]


def test_a_run_that_cannot_go_on_exits_3_with_one_line(capsys):
    def boom():
        raise faults.TrainingAborted("step 3: out of something")
    with pytest.raises(SystemExit) as e:
        guarded(boom)
    assert e.value.code == 3 and capsys.readouterr().err == "error: step 3: out of something\n"


# -- checkpoints: killed saves ------------------------------------------------------------------------------

def ckpt_state(width=16, step=0):
    state = init_state(lambda: nn.Sequential(nn.Linear(width, width), nn.Linear(width, 8)), AdamW(), seed=step)
    return state.replace(step=step)


def in_child(fn) -> int:
    """Run `fn` in a forked child; its exit status (77: it crashed where it was told to). The child must not run
    parallel tensor ops (OpenMP after fork can deadlock): states are built in the parent."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    deadline = time.time() + 60
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child process hung")


# every filesystem step a save takes; a crash is injected before or after each one in turn
FS_OPS = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "makedirs"), (os, "remove"), (shutil, "rmtree"),
          (checkpoint, "save_file"), (checkpoint, "_write_json"), (checkpoint, "_exchange")]


def crash_at(k: int, after: bool, counter: list):
    """Patch FS_OPS so that the k-th call exits the process (0: count only). "after" a file write also tears the
    file in half first, as a kill in the middle of writing it would."""
    for mod, name in FS_OPS:
        real = getattr(mod, name)

        def op(*a, _real=real, _name=name, **kw):
            counter[0] += 1
            if counter[0] == k and not after:
                os._exit(77)
            out = _real(*a, **kw)
            if counter[0] == k and after:
                if _name in ("save_file", "_write_json") and os.path.isfile(a[-1] if _name == "save_file" else a[0]):
                    path = a[-1] if _name == "save_file" else a[0]
                    os.truncate(path, os.path.getsize(path) // 2)
                os._exit(77)
            return out
        setattr(mod, name, op)


def assert_consistent(run, like=None):
    """`latest` names a complete checkpoint, every visible step_<N> is complete, and resuming picks `latest`."""
    root = checkpoint.root_of(run)
    with open(os.path.join(root, "latest")) as f:
        named = os.path.join(root, f.read().strip())
    checkpoint.verify(named)
    for n in os.listdir(root):
        if n.startswith("step_"):
            checkpoint.verify(os.path.join(root, n))
    _, meta, path = checkpoint.restore(like or ckpt_state(), checkpoint.resolve("auto", run))
    assert path == named and meta["step"] == int(named.rsplit("_", 1)[1])


def test_a_save_killed_at_any_point_leaves_latest_on_a_complete_checkpoint(tmp_path):
    """Two situations, each killed before and after every filesystem operation in turn: a new step (which also
    prunes the oldest, keep=2) and a re-save of the newest step (an atomic directory exchange)."""
    run, trials = str(tmp_path / "run"), 0

    def start():   # step_1 and step_2, latest = step_2
        shutil.rmtree(run, ignore_errors=True)
        for s in (1, 2):
            checkpoint.save(ckpt_state(step=s), run, keep=2)
    for step in (3, 2):
        start()
        counter, new = [0], ckpt_state(step=step)
        assert in_child(lambda: (crash_at(0, False, counter), checkpoint.save(new, run, keep=2),
                                 open(tmp_path / "n", "w").write(str(counter[0])))) == 0
        n = int((tmp_path / "n").read_text())
        assert n > 10
        for k in range(1, n + 1):
            for after in (False, True):
                start()
                rc = in_child(lambda: (crash_at(k, after, [0]), checkpoint.save(new, run, keep=2)))
                assert rc == 77, (step, k, after)
                assert_consistent(run)
                checkpoint.save(ckpt_state(step=9), run, keep=2)   # the next save sweeps what the kill left
                assert not [n for n in os.listdir(checkpoint.root_of(run)) if n.startswith(".")]
                trials += 1
    assert trials >= 40


def test_saves_killed_at_random_times(tmp_path):
    """SIGKILL at random moments of a process that does nothing but save (keep=2, ~13 MB per checkpoint)."""
    run, rng, torn = str(tmp_path / "run"), random.Random(0), 0
    state = ckpt_state(width=1024)
    for trial in range(12):
        def save_forever(first=trial * 1000):
            for s in range(first, first + 1000):
                checkpoint.save(state.replace(step=s), run, keep=2)
        pid = os.fork()
        if pid == 0:
            try:
                save_forever()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.2, 0.8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        torn += any(n.startswith(".") for n in os.listdir(checkpoint.root_of(run)))
        assert_consistent(run, state)
    print(f"{torn} of 12 kills left a save half-done")
    assert torn >= 6, "the kills should mostly land inside a save"


# -- checkpoints: damaged files -----------------------------------------------------------------------------

def damage(path: str, how: str, rng: random.Random):
    if how == "truncate":
        os.truncate(path, rng.randrange(os.path.getsize(path)))
    elif how == "bitflip":
        with open(path, "r+b") as f:
            pos = rng.randrange(os.path.getsize(path))
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ (1 << rng.randrange(8))]))
    elif how == "delete":
        os.remove(path)


@pytest.mark.parametrize("how", ["truncate", "bitflip", "delete"])
@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "state.json", "manifest.json"])
def test_damaged_files_are_detected_named_and_skipped(tmp_path, capsys, name, how):
    run = str(tmp_path / "run")
    for s in (1, 2):
        checkpoint.save(ckpt_state(step=s), run, keep=2)
    newest = os.path.join(checkpoint.root_of(run), "step_2")
    damage(os.path.join(newest, name), how, random.Random(f"{name}{how}"))
    capsys.readouterr()
    _, meta, path = checkpoint.restore(ckpt_state(), checkpoint.resolve("auto", run))
    assert path.endswith("step_1") and meta["step"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: skipping checkpoint: {newest}/")
    if name != "manifest.json":   # a flipped bit in the manifest may name the file whose recorded hash it hit
        assert f"{newest}/{name}" in err


def test_a_garbage_latest_falls_back_to_the_newest_complete_step(tmp_path):
    run = str(tmp_path / "run")
    for s in (1, 2):
        checkpoint.save(ckpt_state(step=s), run, keep=2)
    with open(os.path.join(checkpoint.root_of(run), "latest"), "wb") as f:
        f.write(b"\x00\xffstep_99")
    assert checkpoint.restore(ckpt_state(), checkpoint.resolve("auto", run))[2].endswith("step_2")


# -- checkpoints: a full disk -------------------------------------------------------------------------------

def test_too_little_disk_space_fails_before_writing(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    checkpoint.save(ckpt_state(step=1), run)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=10_000))
    with pytest.raises(CheckpointError) as e:
        checkpoint.save(ckpt_state(step=2), run)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("not enough disk space for checkpoint") and "keep_checkpoints" in msg
    assert sorted(os.listdir(checkpoint.root_of(run))) == ["latest", "step_1"]
    assert_consistent(run)


def test_a_write_that_fails_half_way_leaves_no_partial_directory(tmp_path):
    """A real failing write: the file size limit makes the kernel refuse it (EFBIG) half-way through the
    optimizer file, in a child process."""
    run = str(tmp_path / "run")
    checkpoint.save(ckpt_state(width=256, step=1), run)
    err, new = tmp_path / "err", ckpt_state(width=256, step=2)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            checkpoint.save(new, run)
        except CheckpointError as e:
            err.write_text(str(e))
    assert in_child(limited) == 0
    msg = err.read_text()
    assert msg.startswith(f"could not write checkpoint {checkpoint.root_of(run)}/step_2: ") and "File too large" in msg
    assert "the disk is full" in msg and "previous checkpoint is intact" in msg
    assert sorted(os.listdir(checkpoint.root_of(run))) == ["latest", "step_1"]
    assert_consistent(run, new)


# -- loading never runs a stranger's code -------------------------------------------------------------------

class CreatesAFile:
    """A pickle payload: unpickling it calls open(path, "w"), i.e. runs code that creates a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def evil_file(path, marker):
    torch.save({"weight": CreatesAFile(str(marker))}, path)


def test_the_payload_is_real_and_weights_only_refuses_it(tmp_path):
    evil_file(tmp_path / "evil.pt", tmp_path / "created")
    assert in_child(lambda: torch.load(tmp_path / "evil.pt", weights_only=False)) == 0
    assert (tmp_path / "created").exists()   # what an unsafe load does
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "evil.pt", weights_only=True)   # the rule wherever torch.load is unavoidable


def test_a_pickle_posing_as_a_checkpoint_is_refused_and_never_runs(tmp_path, capsys):
    """Someone else's checkpoint with a pickle under model.safetensors and a manifest that matches it."""
    marker, ckpt = tmp_path / "created", str(tmp_path / "theirs" / "step_5")
    state = ckpt_state()
    checkpoint.write_dir(ckpt, {"state.json": lambda p: checkpoint._write_json(p, state.replace(step=5).meta()),
                                "model.safetensors": lambda p: evil_file(p, marker),
                                "optimizer.safetensors": lambda p: evil_file(p, marker)})
    with pytest.raises(CheckpointError, match="none of its 1 checkpoints is complete"):
        checkpoint.restore(state, checkpoint.resolve(ckpt, str(tmp_path / "mine")))
    assert "model.safetensors: not a readable safetensors file" in capsys.readouterr().err
    assert not marker.exists()


def test_a_pytorch_model_bin_is_not_loaded(tmp_path):
    from thcore.interop.hf_gpt2 import read_hf_weights
    evil_file(tmp_path / "pytorch_model.bin", tmp_path / "created")
    with pytest.raises(ConfigError, match="a pickle, not loaded here"):
        read_hf_weights(str(tmp_path))
    assert not (tmp_path / "created").exists()


def test_deepspeed_shards_load_only_from_the_runs_own_directory(tmp_path, capsys):
    """DeepSpeed's checkpoint files are pickles (DeepSpeed loads them with weights_only=False): the documented
    exception, accepted only inside this run's own checkpoints/."""
    from thcore.engines.deepspeed import DeepSpeedEngine
    marker, ckpt = tmp_path / "created", str(tmp_path / "theirs" / "checkpoints" / "step_5")
    os.makedirs(tmp_path / "tag")
    evil_file(tmp_path / "tag" / "mp_rank_00_model_states.pt", marker)
    checkpoint.write_dir(ckpt, {"state.json": lambda p: checkpoint._write_json(p, ckpt_state(step=5).meta()),
                                "latest": lambda p: open(p, "w").write("global_step5"),
                                "global_step5": lambda p: shutil.copytree(tmp_path / "tag", p)})

    def must_not_load(*a, **k):
        raise AssertionError("DeepSpeed was asked to unpickle a foreign checkpoint")
    me = types.SimpleNamespace(is_main=True, cfg=types.SimpleNamespace(run_dir=str(tmp_path / "mine"), resume="auto"),
                               engine=types.SimpleNamespace(load_checkpoint=must_not_load))
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(CheckpointError, match="none of its 1 checkpoints is complete"):
            DeepSpeedEngine.restore(me, ckpt_state(), [ckpt])
    finally:
        dist.destroy_process_group()
    assert "DeepSpeed's shard files are pickles, loaded only from this run's own" in capsys.readouterr().err
    assert not marker.exists()
    assert checkpoint.inside_run(os.path.join(str(tmp_path / "mine"), "checkpoints", "step_5"), str(tmp_path / "mine"))


# -- config: validated before any work ----------------------------------------------------------------------

def test_every_config_field_is_validated_in_one_line():
    bad = {int: "many", float: "lots", bool: "maybe"}
    fields = attrs.fields(TranslationConfig)
    checked = 0
    for f in fields:
        if f.type in bad:   # wrong type, through the command line / JSON and in code
            for build in (lambda: from_dict(TranslationConfig, {f.name: bad[f.type]}),
                          lambda: TranslationConfig(**{f.name: bad[f.type]})):
                with pytest.raises(ConfigError) as e:
                    build()
                assert str(e.value).startswith(f"{f.name}=") and "\n" not in str(e.value)
            checked += 1
        ranged = any(getattr(attrs.fields_dict(k).get(f.name), "validator", None) for k in TranslationConfig.__mro__
                     if attrs.has(k))
        if ranged and f.type in (int, float):   # out of range
            with pytest.raises(ConfigError, match=f"^{f.name}=-1"):
                from_dict(TranslationConfig, {f.name: -1})
    assert checked > 40
    for values, msg in [({"nan_policy": "ignore"}, "nan_policy='ignore': must be one of 'skip', 'stop'"),
                        ({"checkpoint_every": 5, "checkpoint_every_s": 60}, "set either checkpoint_every"),
                        ({"zero_stage": 2}, "zero_stage=2: only used with engine='deepspeed'"),
                        ({"offload": "cpu", "engine": "ddp"}, "offload='cpu': only used with engine='deepspeed'"),
                        ({"resume": "/no/such/run"}, "resume='/no/such/run': no such file or directory"),
                        ({"max_restarts": -1}, "max_restarts=-1: must be >= 0"),
                        ({"nan_polcy": "stop"}, "unknown config field 'nan_polcy' (did you mean 'nan_policy'?)")]:
        with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
            from_dict(TranslationConfig, values)


def test_max_restarts_becomes_torchruns_and_eager_runs_get_supervised():
    from thcore.launch import command
    cmd = command("r.py", 2, {"max_restarts": 3, "nproc": 2, "lr": 0.1}, 29500, 3)
    assert "--max-restarts=3" in cmd and cmd.index("--max-restarts=3") < cmd.index("--recipe")
    assert not [a for a in cmd if a.startswith(("--max_restarts", "--nproc="))]
    assert os.path.join("launchers", "single.py") in " ".join(command("r.py", 1, {}, 29500, 1, "single.py"))


# -- processes: a worker killed, a peer dead or hung --------------------------------------------------------

def test_kill_9_of_a_worker_under_torchrun_max_restarts_ends_bitwise_equal(tmp_path):
    """`th.py run --nproc=2 --max_restarts=1` (torchrun --max-restarts=1): rank 1 is SIGKILLed as step 13 starts;
    torchrun restarts both workers, which resume from step_10 and finish. Final params and optimizer state are
    bitwise those of the uninterrupted run. Both runs also skip a non-finite step 4 (rank 0's batch only: the
    all-reduced gradients make every rank skip it)."""
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    env = {**ENV, "TH_FAULT_NAN_STEP": "4"}
    th("run", RECIPE, "--nproc=2", *run_args(ref), env=env, timeout=TIMEOUT)
    p = th("run", RECIPE, "--nproc=2", "--max_restarts=1", *run_args(cut), env={**env, "TH_FAULT_KILL_STEP": "13"},
           timeout=TIMEOUT)
    log = p.stdout + p.stderr
    assert "exitcode: -9" in log and f"resumed from {cut}/checkpoints/step_10 at step 10" in log, log[-4000:]
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(os.path.join(r, "checkpoints", "step_20", name)) for r in (ref, cut))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert [(r["step"], r["nonfinite_steps"]) for r in train_rows(cut)] == \
        [(r["step"], r["nonfinite_steps"]) for r in train_rows(ref)] == [(5, 1.0), (10, 0.0), (15, 0.0), (20, 0.0)]


def test_an_eager_run_with_max_restarts_is_supervised_by_torchrun(tmp_path):
    """`th.py run --engine=eager --max_restarts=1`: one process under torchrun; killed at step 13, it is restarted
    and ends bitwise where the same run in this process (one thread, as the child) ends."""
    cut, ref = str(tmp_path / "cut"), str(tmp_path / "ref")
    p = th("run", RECIPE, "--engine=eager", "--max_restarts=1", *run_args(cut, **SMALL_EVAL), timeout=TIMEOUT,
           env={**ENV, "TH_FAULT_KILL_STEP": "13", "TH_FAULT_KILL_RANK": "0"})
    log = p.stdout + p.stderr
    assert "exitcode: -9" in log and f"resumed from {cut}/checkpoints/step_10 at step 10" in log, log[-4000:]
    cfg, mod = configure(os.path.join(ROOT, "recipes", "ddp_translation.py"),
                         {**RUN, **SMALL_EVAL, "engine": "eager", "out_dir": ref})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = fit(cfg, mod.build(cfg), EagerEngine(cfg))
    finally:
        torch.set_num_threads(threads)
    got = load_file(os.path.join(cut, "checkpoints", "step_20", "model.safetensors"))
    assert all(torch.equal(got[k], state.params[k]) for k in state.params)


def _state_of(pid) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("sig", ["KILL", "STOP"], ids=["dead", "hung"])
def test_a_dead_or_hung_peer_ends_the_survivor_within_the_timeout(tmp_path, sig):
    """Two ranks started by hand (no torchrun to stop or restart anyone); rank 1 is SIGKILLed (dead) or SIGSTOPped
    (hung) as step 13 starts. Rank 0 must leave with one line within dist_timeout_s."""
    timeout_s, out = 6, str(tmp_path / "run")
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "TH_FAULT_KILL_STEP": "13", "TH_FAULT_SIGNAL": sig}
    cmd = [sys.executable, MULTINODE, "--recipe", RECIPE, *run_args(out, max_steps=40, dist_timeout_s=timeout_s)]
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in (0, 1)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=logs[r],
                              stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        deadline = time.time() + TIMEOUT
        while _state_of(procs[1].pid) not in ("T", "gone", "Z") and time.time() < deadline:
            time.sleep(0.02)
        fault = time.time()
        rc = procs[0].wait(timeout=timeout_s + 30)
        took = time.time() - fault
    finally:
        for p in procs:
            p.kill()
            p.wait()
    logs[0].seek(0)
    last = logs[0].read().strip().splitlines()[-1]
    assert rc == 3 and last.startswith("error: step 13: lost contact with another rank"), last
    assert f"dist_timeout_s={timeout_s}" in last and f"Latest checkpoint: {out}/checkpoints/step_10" in last
    print(f"{sig}: the survivor left {took:.1f} s after the fault")   # pytest -s shows it (docs/RELIABILITY.md)
    # dead: gloo sees the closed connection at once; hung: the collective times out after dist_timeout_s
    assert took < (timeout_s if sig == "KILL" else timeout_s + 3), took
