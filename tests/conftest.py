import contextlib
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
sys.path.insert(0, ROOT)

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


@pytest.fixture
def tiny(tmp_path):
    return lambda **kw: tiny_config(tmp_path, **kw)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on CPU machines (run on a GPU machine)")
    config.addinivalue_line("markers", "bitwise: a gpu test that compares bits: deterministic CUDA kernels "
                                       "(deterministic_cuda)")


# -- deterministic CUDA kernels for the gpu tests that compare bits ---------------------------------------
CUBLAS_DETERMINISTIC = ":4096:8"   # cuBLAS's fixed-workspace setting: the same reduction order on every run


def pytest_sessionstart(session):
    # torch sizes cuBLAS's workspace once, at the first matmul of the process: set before any test runs one
    import torch
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


@contextlib.contextmanager
def deterministic_cuda():
    """torch.use_deterministic_algorithms(True) with CUBLAS_WORKSPACE_CONFIG=:4096:8 (what it requires of cuBLAS)
    until the end of the block, then the previous settings; without CUDA, nothing at all."""
    import torch
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


@pytest.fixture(autouse=True)
def _bitwise_gpu(request):
    """Tests marked both `gpu` and `bitwise` run under deterministic_cuda()."""
    node = request.node
    bitwise = node.get_closest_marker("gpu") and node.get_closest_marker("bitwise")
    with deterministic_cuda() if bitwise else contextlib.nullcontext():
        yield
