"""pytest's hooks and fixtures for every test under tests/; the plain helpers are in tests/helpers.py."""
import contextlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # tests/: `from helpers import ...` in every file
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root: thcore, recipes
# helpers is imported inside the hooks: its ENV copies os.environ after pytest_sessionstart has set it up


@pytest.fixture
def tiny(tmp_path):
    from helpers import tiny_config
    return lambda **kw: tiny_config(tmp_path, **kw)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped on CPU machines (run on a GPU machine)")
    config.addinivalue_line("markers", "bitwise: a gpu test that compares bits: deterministic CUDA kernels "
                                       "(deterministic_cuda)")


def pytest_sessionstart(session):
    # torch sizes cuBLAS's workspace once, at the first matmul of the process: set before any test runs one
    import torch

    from helpers import CUBLAS_DETERMINISTIC
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)


@pytest.fixture(autouse=True)
def _bitwise_gpu(request):
    """Tests marked both `gpu` and `bitwise` run under deterministic_cuda()."""
    from helpers import deterministic_cuda
    node = request.node
    bitwise = node.get_closest_marker("gpu") and node.get_closest_marker("bitwise")
    with deterministic_cuda() if bitwise else contextlib.nullcontext():
        yield
