"""The DeepSpeed engine: ZeRO stages 0-3, CPU/NVMe offload and DeepSpeed's mixed precision around the same loss.

DeepSpeed wraps `LossModule`, whose forward is `step.loss_fn` (the one definition of the loss); DeepSpeed does the
rest: gradient averaging, partitioning (ZeRO), offload, loss scaling, clipping and the update. train_step's
normalisation is kept exactly: the summed token loss of a step is divided by the step's *global* token count, and
multiplied by grad_accum x world_size, which DeepSpeed divides out again (it averages over micro-batches and ranks).
With fp32 and powers of two these factors are exact: the gradients are the eager engine's.

    TrainState.params      the live parameters of the module DeepSpeed trains (at ZeRO-3, partitioned
                           `nn.Parameter`s that DeepSpeed gathers layer by layer inside each forward: evaluation
                           runs the model's own submodules, so it never holds the whole model)
    TrainState.opt_state   {} (DeepSpeed owns the optimizer state; it is in its checkpoint files)

Checkpoints: DeepSpeed's own layout (`latest`, the tag directory `global_step<N>/` with every rank's shards,
`zero_to_fp32.py`) inside our `checkpoints/step_<N>/`, with our `state.json` and `manifest.json` beside it; the
directory is renamed into place and named by `checkpoints/latest` as for every engine. `th.py export` turns one
into an eager checkpoint (`consolidate` below). The run directory must be on a filesystem every node sees.
"""
import datetime
import gc
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint, tree
from ..config import ConfigError
from ..optim import _groups
from ..step import IGNORE, dropout_seed, loss_fn
from .ddp import backend_and_device, check_torchrun_env

INSTALL_HINT = "pip install 'torch-handle[deepspeed]' (or pip install deepspeed)"
_PRECISION = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


def require_deepspeed():
    """The deepspeed module, or a one-line ConfigError saying how to install it."""
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        if e.name != "deepspeed":
            raise
        raise ConfigError(f"engine='deepspeed': DeepSpeed is not installed; {INSTALL_HINT}") from None
    return deepspeed


# -- the DeepSpeed config -----------------------------------------------------------------------------------

def _offload(cfg, what: str) -> dict:
    if cfg.offload == "cpu":
        return {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"device": "nvme", "nvme_path": cfg.nvme_path, "pin_memory": torch.cuda.is_available()}


def build_config(cfg, world_size: int) -> dict:
    """The DeepSpeed config a recipe's fields describe (printed at start; `deepspeed_config` replaces it)."""
    if cfg.offload != "none" and cfg.zero_stage == 0:
        raise ConfigError(f"offload={cfg.offload!r}: needs zero_stage >= 1 (ZeRO-Offload partitions the optimizer)")
    if cfg.offload == "nvme" and cfg.zero_stage != 3:
        raise ConfigError(f"offload='nvme': needs zero_stage=3 (ZeRO-Infinity), not zero_stage={cfg.zero_stage}")
    zero = {"stage": cfg.zero_stage}
    if cfg.offload != "none":
        zero["offload_optimizer"] = _offload(cfg, "optimizer")
        if cfg.zero_stage == 3:
            zero["offload_param"] = _offload(cfg, "param")
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,    # our torch optimizer (AdamW/SGD) under ZeRO
        "zero_force_ds_cpu_optimizer": False,     # offloaded SGD: torch's, on the CPU partitions
        "steps_per_print": 2 ** 31 - 1,           # the loop logs
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.precision == "fp16":   # dynamic loss scale, as train_step's: start at 2^16, x2 after N good steps
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000,
                      "hysteresis": 1, "min_loss_scale": 1}
    if cfg.offload != "none" and cfg.optimizer == "adamw":   # DeepSpeedCPUAdam: the offloaded optimizer that pays
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "betas": [cfg.beta1, cfg.beta2], "eps": cfg.eps,
                                                       "weight_decay": cfg.weight_decay}}
    return ds


def user_config(cfg, world_size: int) -> dict:
    """`cfg.deepspeed_config` as-is, checked against the recipe where both say the same thing."""
    try:
        with open(cfg.deepspeed_config) as f:
            ds = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"deepspeed_config={cfg.deepspeed_config!r}: {e}") from None
    mine = {"train_micro_batch_size_per_gpu": ("batch_size", cfg.batch_size),
            "gradient_accumulation_steps": ("grad_accum", cfg.grad_accum),
            "train_batch_size": (f"batch_size x grad_accum x world_size ({cfg.batch_size} x {cfg.grad_accum} x "
                                 f"{world_size})", cfg.batch_size * cfg.grad_accum * world_size)}
    for key, (field, value) in mine.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"deepspeed_config={cfg.deepspeed_config!r}: {key}={ds[key]} contradicts the recipe's "
                              f"{field}={value}; change one of them")
    for key, (_, value) in mine.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    return ds


def check(cfg, world_size: int) -> dict:
    """Fail early (before any process starts) on a missing DeepSpeed or a contradicting config; returns the
    DeepSpeed config the run will use."""
    require_deepspeed()
    return user_config(cfg, world_size) if cfg.deepspeed_config else build_config(cfg, world_size)


def make_optimizer(cfg, model: nn.Module, ds_config: dict):
    """(optimizer or None, parameter groups): our torch optimizer with train_step's groups (matrices decay), or
    None when the DeepSpeed config names one (DeepSpeedCPUAdam under offload)."""
    params = dict(model.named_parameters())
    decay, no_decay = _groups(params)
    groups = [{"params": [params[k] for k in names], "weight_decay": wd}
              for names, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if names]
    if "optimizer" in ds_config:
        return None, groups
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=True)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    return opt, groups


class LossModule(nn.Module):
    """What DeepSpeed wraps: the model, with train_step's loss as forward -> (sum of token losses, tokens)."""

    def __init__(self, model: nn.Module, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch):
        # the module holds the params itself (DeepSpeed partitions and gathers them): nothing to substitute
        return loss_fn(self.model, {}, {}, batch, self.label_smoothing)


# -- the engine -------------------------------------------------------------------------------------------

class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, cfg):
        deepspeed = require_deepspeed()
        check_torchrun_env("engine='deepspeed'")   # torchrun and the deepspeed launcher both set it
        self.cfg = cfg
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        self.ds_config = check(cfg, self.world_size)
        backend, self.device = backend_and_device(cfg.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        self.engine = None
        if self.is_main:
            print(f"deepspeed config{' (' + cfg.deepspeed_config + ')' if cfg.deepspeed_config else ''}: "
                  f"{json.dumps(self.ds_config, sort_keys=True)}", file=sys.stderr)

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def init(self, state):
        import deepspeed
        model = state.model
        with torch.no_grad():   # the module's own tensors take the state's values (e.g. LM init_from)
            for k, p in model.named_parameters():
                p.copy_(state.params[k])
            for k, b in model.named_buffers():
                b.copy_(state.buffers[k])
        opt, groups = make_optimizer(self.cfg, model, self.ds_config)
        self.engine, *_ = deepspeed.initialize(model=LossModule(model, state.options.label_smoothing),
                                               optimizer=opt, model_parameters=groups, config=self.ds_config)
        self._own_lr = "scheduler" not in self.ds_config   # a user's DeepSpeed scheduler owns the lr
        return self._view(state)

    def _view(self, state):
        """The state's pytree view of the module DeepSpeed trains (live tensors; nothing copied)."""
        model = self.engine.module.model
        return state.replace(model=model, params=dict(model.named_parameters()),
                             buffers=dict(model.named_buffers()), opt_state={}, tx=None)

    def num_params(self, state) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in state.params.values())   # ZeRO-3: partitioned

    def step(self, state, batch):
        microbatches = batch if isinstance(batch, (list, tuple)) else [batch]
        if len(microbatches) != self.engine.gradient_accumulation_steps():
            raise ConfigError(f"grad_accum: the DeepSpeed config accumulates {self.engine.gradient_accumulation_steps()} "
                              f"micro-batches, the loop gave {len(microbatches)}")
        ntok = sum((mb["targets"] != IGNORE).sum() for mb in microbatches)
        # train_step's normalisation; DeepSpeed divides by grad_accum and averages over ranks: undo both
        scale = (len(microbatches) * self.world_size) / self.reduce_sum(ntok).clamp(min=1).float()
        lr = state.lr_fn(state.step)
        if self._own_lr:
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
        loss_sum, norm = 0.0, None
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for i, mb in enumerate(microbatches):
                torch.manual_seed(dropout_seed(state.seed, state.step, i, self.rank))   # as train_step
                ls, _ = self.engine(mb)
                self.engine.backward(ls * scale)
                if i == len(microbatches) - 1 and self.zero_stage == 0 and self.ds_config.get("bf16") is None \
                        and self.ds_config.get("fp16") is None:   # plain torch optimizer: DeepSpeed keeps no norm
                    norm = tree.global_norm([p.grad for p in self.engine.module.parameters() if p.grad is not None])
                self.engine.step()
                loss_sum = loss_sum + ls.detach().float()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if norm is None else float(norm))
        metrics = {"loss_sum": loss_sum, "ntokens": ntok, "grad_norm": norm,
                   "lr": lr if self._own_lr else self.engine.get_lr()[0]}
        if not self.engine.was_step_applied():   # fp16 overflow: DeepSpeed skipped the update, lowered the scale
            metrics["skipped"] = 1
        return state.replace(step=state.step + 1), metrics

    def reduce_sum(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    # -- checkpoints --------------------------------------------------------------------------------------
    def save(self, state, run_dir, keep=3, extra=None):
        """Every rank writes its shards into one staging directory; rank 0 moves them into checkpoints/step_<N>
        with state.json and a manifest (atomically, as checkpoint.save), then names it `latest`."""
        root = checkpoint.root_of(run_dir)
        staging = os.path.join(root, f".ds-step_{state.step}")
        if self.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        dist.barrier()
        meta = {**state.meta(), **(extra or {})}
        self.engine.save_checkpoint(staging, tag=f"global_step{state.step}", client_state={"torch_handle": meta})
        dist.barrier()   # every rank's shards are written
        path = None
        if self.is_main:
            files = {n: (lambda dst, src=os.path.join(staging, n): os.replace(src, dst)) for n in os.listdir(staging)}
            path = checkpoint.save(state, run_dir, keep=keep, extra=extra, write_tensors=False, files=files)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()   # nobody reads or prunes checkpoints while rank 0 writes one
        return path

    def restore(self, state, paths):
        """Rank 0 picks the newest complete DeepSpeed checkpoint among `paths` (verified against its manifest;
        damaged ones are skipped with a warning); every rank then loads its shards from it."""
        pick = [None, None]   # path, error
        if self.is_main:
            for p in paths:
                try:
                    checkpoint.verify(p)
                    if not os.path.isfile(os.path.join(p, "latest")):
                        raise checkpoint.CheckpointError(f"{p}: not a DeepSpeed checkpoint (written by another "
                                                         "engine: resume it with that engine, or start over)")
                    pick[0] = p
                    break
                except checkpoint.CheckpointError as e:
                    print(f"warning: skipping checkpoint: {e}", file=sys.stderr)
            if paths and pick[0] is None:
                pick[1] = (f"{os.path.dirname(paths[0])}: none of its {len(paths)} checkpoints is a complete "
                           "DeepSpeed checkpoint; move them away or pass --resume=never")
        dist.broadcast_object_list(pick, src=0)
        if pick[1]:
            raise checkpoint.CheckpointError(pick[1])
        if pick[0] is None:
            return state, None, None
        loaded, _ = self.engine.load_checkpoint(pick[0], load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise checkpoint.CheckpointError(f"{pick[0]}: DeepSpeed could not load it")
        with open(os.path.join(pick[0], "state.json")) as f:
            meta = json.load(f)
        return self._view(state).with_meta(meta), meta, pick[0]

    def barrier(self):
        dist.barrier()

    def close(self, clean: bool = True):
        if not dist.is_initialized():
            return
        if clean:
            dist.barrier()
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None
        gc.collect()
        dist.destroy_process_group()
