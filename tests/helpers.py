"""What several test files share, as plain functions and constants: `from helpers import th, TINY`.

tests/conftest.py puts tests/ on sys.path, so the files under tests/unit/ and tests/integration/ import this module
by name; a script a test launches (tests/scripts/, tests/recipes/) puts tests/ on its own path first (TESTS)."""
import contextlib
import os
import signal
import socket
import subprocess
import sys

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
SCRIPTS = os.path.join(TESTS, "scripts")      # worker scripts that tests start under torchrun
TEST_RECIPES = os.path.join(TESTS, "recipes")  # recipes that exist for tests only (fault injection, ...)
MULTINODE = os.path.join(ROOT, "launchers", "multinode.py")

# a model small enough that a run takes seconds on 2 cores
TINY = dict(d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=64, dropout=0.1,
            batch_size=16, demo_train_size=800, demo_valid_size=64, demo_test_size=32, log_every=5,
            warmup_steps=5, lr=2e-3)


def tiny_config(tmp_path, **overrides):
    from thcore.config import from_dict
    from thcore.tasks.translation import TranslationConfig
    return from_dict(TranslationConfig, {"name": "tiny", "out_dir": str(tmp_path / "run"), **TINY, **overrides})


def th(*args, timeout=300, check=True, **kw):
    """Run `python th.py ...` from the repo root; returns the CompletedProcess."""
    kw.setdefault("cwd", ROOT)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "th.py"), *map(str, args)],
                       capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"th.py {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def shakespeare_chars(tmp_path_factory, n_chars: int) -> str:
    """A prepared char-level data dir (train.bin, val.bin, meta.json) of tiny Shakespeare's first n_chars;
    its source text is small.txt next to it."""
    from thcore.data import lm
    d = tmp_path_factory.mktemp("chars")
    with open(os.path.join(DATA, "tinyshakespeare", "input.txt")) as f:
        (d / "small.txt").write_text(f.read(n_chars))
    lm.prepare(str(d / "small.txt"), str(d / "char"), "char")
    return str(d / "char")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multi30k_dir(tmp_path, train, valid, test, name="m30k") -> str:
    """The first lines of Multi30k (train, valid and test lines of each language) in tmp_path/name, the files
    named as --data_dir expects."""
    from thcore.data.translation import read_lines
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    for split, n in (("train", train), ("valid", valid), ("test", test)):
        for lang in ("en", "de"):
            lines = read_lines(os.path.join(DATA, "multi30k-en-de", f"{split}.{lang}"), split)[:n]
            (d / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines))
    return str(d)


# -- multi-process runs on this machine: torchrun with gloo, the tiny DDP translation run ----------------------
B, STEPS = 8, 20   # per-rank batch; steps of every RUN
RUN = {**TINY, "dropout": 0.0, "batch_size": B, "optimizer": "sgd", "lr": 0.2, "max_steps": STEPS,
       "checkpoint_every": 10, "keep_checkpoints": 10, "demo_valid_size": 31, "demo_test_size": 8, "log_every": 5,
       "dist_timeout_s": 120}   # a deadlocked rank dies by itself (torchrun's workers outlive a killed torchrun)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # 2 ranks on 2 cores; also silences torchrun's banner
TIMEOUT = 240   # seconds per launch: generous on 2 shared cores


def demo_batches(sentences: int, batch: int):
    """(source vocab, target vocab, batches): the built-in demo corpus's first `sentences` pairs, `batch` a batch."""
    from thcore.data import demo
    from thcore.data.translation import TokenPairs, collate
    from thcore.data.vocab import Vocab
    src, tgt = demo.corpus(sentences, seed=3)
    sv, tv = Vocab.build(s.split() for s in src), Vocab.build(t.split() for t in tgt)
    ds = TokenPairs.from_lines(src, tgt, sv, tv, max_len=40)
    return sv, tv, [collate([ds[i] for i in range(j, j + batch)]) for j in range(0, sentences, batch)]


def run_args(out, base=RUN, **kw):
    """`--field=value` flags of `base` with out_dir=out and the overrides kw."""
    return [f"--{k}={v}" for k, v in {**base, "out_dir": out, **kw}.items()]


def assert_close(a, b, rtol=1e-5, atol=1e-7):
    """Two state dicts: the same keys, every tensor equal to rounding."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


# -- what a run leaves to read ----------------------------------------------------------------------------
def rows(run, split):
    """The metrics.jsonl lines of `split` ("train", "val", "test") of the run directory `run`."""
    from thcore.metrics import read_jsonl
    return [r for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if r["split"] == split]


def tensorboard_history(run_dir) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard itself reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def jsonl_history(run_dir) -> dict:
    """The same shape from metrics.jsonl (every numeric field but step)."""
    from thcore.metrics import read_jsonl
    out = {}
    for row in read_jsonl(os.path.join(run_dir, "metrics.jsonl")):
        for k, v in row.items():
            if k not in ("step", "split"):
                out.setdefault(f"{row['split']}/{k}", []).append((row["step"], v))
    return out


def assert_same_history(run_dir):
    """TensorBoard's event files and metrics.jsonl hold the same tags, steps and values."""
    import pytest
    tb, js = tensorboard_history(run_dir), jsonl_history(run_dir)
    assert tb.keys() == js.keys()
    for tag in js:
        assert [s for s, _ in tb[tag]] == [s for s, _ in js[tag]], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in js[tag]], rel=1e-6), tag


# -- faults -----------------------------------------------------------------------------------------------
def stop_after(task, n_batches):
    """`task`, whose loader sends this process SIGINT (as Ctrl-C does) when it hands out batch `n_batches`: the
    run checkpoints and stops after that step."""
    orig, seen = task.train_loader, [0]

    def loader(epoch, start, engine):
        for b in orig(epoch, start, engine):
            seen[0] += 1
            if seen[0] == n_batches:
                os.kill(os.getpid(), signal.SIGINT)
            yield b
    task.train_loader = loader
    return task


def poisoned(loss_fn):
    """loss_fn, with an infinite loss for a batch that carries the key "poison" (as a bad batch would give)."""
    def fn(model, params, buffers, batch, *args, **kwargs):
        if "poison" not in batch:
            return loss_fn(model, params, buffers, batch, *args, **kwargs)
        loss_sum, ntok = loss_fn(model, params, buffers, {k: v for k, v in batch.items() if k != "poison"},
                                 *args, **kwargs)
        return loss_sum * float("inf"), ntok
    fn.poisoned = True
    return fn


# -- a two-layer model and its batches for the step's numerics (fused kernels, the fp16 loss scale) ----------
class Probe(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


def probe_state(impl="fused", **options):
    from thcore.optim import AdamW
    from thcore.state import StepOptions, init_state
    return init_state(Probe, AdamW(weight_decay=0.1, impl=impl), seed=0, lr=1e-2, options=StepOptions(**options))


def probe_batch(seed=0, bad=False):
    g = torch.Generator().manual_seed(seed)
    batch = {"x": torch.randn(8, 4, generator=g), "targets": torch.randint(0, 3, (8,), generator=g)}
    if bad:
        batch["x"][3, 1] = float("nan")   # NaN survives tanh: a non-finite loss
    return batch


# -- deterministic CUDA kernels for the gpu tests that compare bits ---------------------------------------
CUBLAS_DETERMINISTIC = ":4096:8"   # cuBLAS's fixed-workspace setting: the same reduction order on every run


@contextlib.contextmanager
def deterministic_cuda():
    """torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8 (what it requires of cuBLAS)
    until the end of the block, then the previous settings; without CUDA, nothing at all."""
    if not torch.cuda.is_available():
        yield
        return
    env, flag = os.environ.get("CUBLAS_WORKSPACE_CONFIG"), torch.are_deterministic_algorithms_enabled()
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_DETERMINISTIC
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(flag)
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG")
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env
