"""The DDP translation recipe, but rank 0 alone gets SIGTERM after its 12th batch (in the first run only: a resume
starts past it). tests/integration/test_ddp.py checks that the ranks agree to stop."""
import os
import signal

from recipes import ddp_translation as base

Config = base.Config


def build(cfg):
    """The DDP recipe, but rank 0 alone gets SIGTERM after its 12th batch (in the first run only)."""
    task = base.build(cfg)
    orig = task.train_loader

    def loader(epoch, start, engine):
        for i, b in enumerate(orig(epoch, start, engine)):
            if engine.rank == 0 and epoch == 0 and start + i == 12:
                os.kill(os.getpid(), signal.SIGTERM)
            yield b
    task.train_loader = loader
    return task
