"""torch-handle's functional core: params are a dict of tensors, training is `train_step(state, batch)`."""
from .checkpoint import load as load_checkpoint, save as save_checkpoint
from .config import Config, ConfigError
from .func import apply, init
from .optim import SGD, AdamW, schedule
from .state import StepOptions, TrainState, init_state
from .step import eval_step, loss_fn, train_step
from . import research

__all__ = ["AdamW", "SGD", "Config", "ConfigError", "StepOptions", "TrainState", "apply", "eval_step", "init",
           "init_state", "load_checkpoint", "loss_fn", "research", "save_checkpoint", "schedule", "train_step"]
