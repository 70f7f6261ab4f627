"""The DDP translation recipe with faults injected through environment variables (tests/integration/test_faults.py):

    TH_FAULT_NAN_STEP=k [TH_FAULT_NAN_RANK=r]     step k's batch on rank r (default 0) has an infinite loss
    TH_FAULT_KILL_STEP=k [TH_FAULT_KILL_RANK=r]   rank r (default 1) sends itself TH_FAULT_SIGNAL (KILL or STOP)
                                                  when step k starts, in torchrun's first attempt only
    TH_FAULT_OOM_STEP=k                           step k raises torch.OutOfMemoryError (as CUDA would)

Steps count from 1 and are counted within the first epoch."""
import os
import signal
import sys

import torch

import thcore.engines.ddp
import thcore.step
from recipes import ddp_translation as base

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/, for helpers
from helpers import poisoned  # noqa: E402

Config = base.Config


def _env(name, default=None):
    v = os.environ.get(name)
    return int(v) if v else default


def build(cfg):
    if not getattr(thcore.step.loss_fn, "poisoned", False):   # this process runs the recipe: patch its engines
        thcore.step.loss_fn = poisoned(thcore.step.loss_fn)              # the eager engine's step
        thcore.engines.ddp.loss_fn = poisoned(thcore.engines.ddp.loss_fn)   # the DDP engine's
    task = base.build(cfg)
    orig = task.train_loader
    nan_step, nan_rank = _env("TH_FAULT_NAN_STEP"), _env("TH_FAULT_NAN_RANK", 0)
    kill_step, kill_rank = _env("TH_FAULT_KILL_STEP"), _env("TH_FAULT_KILL_RANK", 1)
    sig = getattr(signal, f"SIG{os.environ.get('TH_FAULT_SIGNAL', 'KILL')}")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"

    def loader(epoch, start, engine):
        for i, b in enumerate(orig(epoch, start, engine)):
            step = start + i + 1 if epoch == 0 else None
            if step == kill_step and engine.rank == kill_rank and first_attempt:
                os.kill(os.getpid(), sig)
            if step == nan_step and engine.rank == nan_rank:
                b = {**b, "poison": torch.ones(())}
            yield b
    task.train_loader = loader

    oom_step = _env("TH_FAULT_OOM_STEP")
    if oom_step:
        from thcore.engines.eager import EagerEngine
        step_fn = EagerEngine.step

        def step(self, state, batch):
            if state.step + 1 == oom_step:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            return step_fn(self, state, batch)
        EagerEngine.step = step
    return task
