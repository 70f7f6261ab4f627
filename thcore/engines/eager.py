"""The eager engine: one process, one device; calls train_step with donation."""
from .. import checkpoint
from ..func import pick_device
from ..step import train_step
from . import use_tf32
from ..func import bind
from .runtime import Engine


class EagerEngine(Engine):
    name = "eager"

    def __init__(self, cfg):
        self.device = self.build_device = pick_device(cfg.device)   # params drawn straight onto the device
        self.resume = cfg.resume   # the wording of a failed resume
        self.saver = checkpoint.Saver(background=cfg.async_checkpoint)

    def init(self, state):
        state = state.to(self.device)
        use_tf32(self.device)
        if set(dict(state.model.named_parameters())) == set(state.params):
            bind(state.model, state.params, state.buffers)   # the module's tensors are the state's: stored once
        return state

    def step(self, state, batch):
        return train_step(state, batch, donate=True)

    def save(self, state, run_dir, keep=3, extra=None):
        return self.saver.save(state, run_dir, keep=keep, extra=extra)

    def wait_saves(self):
        self.saver.wait()

    def restore(self, state, paths):
        return checkpoint.restore(state, paths, resume=self.resume)
