"""The DeepSpeed engine: ZeRO stages 0-3, CPU/NVMe offload and DeepSpeed's mixed precision around the same loss.

DeepSpeed wraps `LossModule`, whose forward is `step.loss_fn` (the one definition of the loss); DeepSpeed does the
rest: gradient averaging, partitioning (ZeRO), offload, loss scaling, clipping and the update. train_step's
normalisation is kept exactly: the summed token loss of a step is divided by the step's *global* token count, and
multiplied by grad_accum x world_size, which DeepSpeed divides out again (it averages over micro-batches and ranks).
With fp32 and powers of two these factors are exact: the gradients are the eager engine's.

    TrainState.params      the live parameters of the module DeepSpeed trains (at ZeRO-3 partitioned
                           `nn.Parameter`s, gathered layer by layer inside each forward; evaluation gets whole
                           ones through `eval_state`, which the loop asks for)
    TrainState.opt_state   {} (DeepSpeed owns the optimizer state; it is in its checkpoint files)

Checkpoints: DeepSpeed's own layout (`latest`, the tag directory `global_step<N>/` with every rank's shards,
`zero_to_fp32.py`) inside our `checkpoints/step_<N>/`, with our `state.json` and `manifest.json` beside it; the
directory is renamed into place and named by `checkpoints/latest` as for every engine. `th.py export` turns one
into an eager checkpoint (thcore/consolidate.py). The run directory must be on a filesystem every node sees.
"""
import contextlib
import copy
import datetime
import json
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist
from torch import nn

from .. import checkpoint, tree, weights
from ..config import ConfigError
from ..consolidate import require_deepspeed
from ..func import bind
from ..optim import _groups
from ..step import LossModule, train_step
from . import use_tf32
from .runtime import Runtime

# -- the DeepSpeed config -----------------------------------------------------------------------------------

def _offload(cfg) -> dict:
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
    if cfg.zero_stage >= 2:   # reduce gradients into one contiguous buffer, overlapped with backward on a side
        zero["contiguous_gradients"] = True   # stream (CUDA only: the CPU accelerator has no streams to overlap)
        zero["overlap_comm"] = torch.cuda.is_available()
    if cfg.offload != "none":
        zero["offload_optimizer"] = _offload(cfg)
        if cfg.zero_stage == 3:
            zero["offload_param"] = _offload(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.clip_grad,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,    # our torch optimizer (AdamW/SGD) under ZeRO
        "zero_force_ds_cpu_optimizer": False,     # offloaded SGD: torch's, on the CPU partitions
        "steps_per_print": 2 ** 31 - 1,           # the loop logs
        # the loop times the steps: DeepSpeed's throughput timer would synchronise the device twice a micro-batch
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        # bf16 sums of many micro-batches lose bits: ZeRO's optimizer accumulates (and reduces) them in fp32 from
        # stage 2 (at stage 1 DeepSpeed would switch to its BF16_Optimizer, whose checkpoints zero_to_fp32 cannot read)
        if cfg.zero_stage >= 2 or (cfg.zero_stage == 1 and cfg.offload != "none"):
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
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


def _check_nvme(ds: dict):
    """NVMe offload swaps through DeepSpeed's async_io op, which builds only where libaio is installed."""
    zero = ds.get("zero_optimization", {})
    if not any((zero.get(k) or {}).get("device") == "nvme" for k in ("offload_optimizer", "offload_param")):
        return
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().get_op_builder("AsyncIOBuilder")
    if builder is None or not builder().is_compatible(verbose=False):
        raise ConfigError("offload='nvme': DeepSpeed's async_io op cannot be built on this machine: it needs libaio "
                          "(apt install libaio-dev; `ds_report` shows async_io as compatible once it is)")


def check(cfg, world_size: int) -> dict:
    """Fail early (before any process starts) on a missing DeepSpeed, a contradicting config or an NVMe offload
    this machine cannot do; returns the DeepSpeed config the run will use."""
    require_deepspeed()
    ds = user_config(cfg, world_size) if cfg.deepspeed_config else build_config(cfg, world_size)
    _check_nvme(ds)
    return ds


def make_optimizer(cfg, model: nn.Module, ds_config: dict):
    """(optimizer or None, parameter groups): our torch optimizer with train_step's groups (matrices decay), or
    None when the DeepSpeed config names one (DeepSpeedCPUAdam under offload)."""
    params = dict(model.named_parameters())
    decay, no_decay = _groups(params)
    groups = [{"params": [params[k] for k in names], "weight_decay": wd}
              for names, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)) if names]
    if "optimizer" in ds_config:
        return None, groups
    # torch's fused kernel on a GPU (one pass over params, grads and moments); foreach on the CPU accelerator
    kernel = {"fused": True} if torch.cuda.is_available() and cfg.device != "cpu" else {"foreach": True}
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kernel)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, **kernel)
    return opt, groups


# -- the engine -------------------------------------------------------------------------------------------

class DeepSpeedEngine(Runtime):
    name = "deepspeed"

    def __init__(self, cfg):
        deepspeed = require_deepspeed()
        super().__init__(cfg, "engine='deepspeed'")   # torchrun and the deepspeed launcher both set its variables
        self.ds_config = check(cfg, self.world_size)
        if self.device.type == "cpu" and self.ds_config.get("fp16", {}).get("enabled"):
            raise ConfigError("precision='fp16': DeepSpeed's CPU accelerator has no fp16 (\"Type fp16 is not supported "
                              "on your device\"); use precision='bf16' on CPU, or fp16 on a GPU")
        if cfg.compile:
            raise ConfigError("compile=True: not supported with engine='deepspeed' (use eager or ddp)")
        self.start(bind_device=False)
        deepspeed.init_distributed(dist_backend=self.backend,
                                   timeout=datetime.timedelta(seconds=cfg.dist_timeout_s))
        self.engine = None
        if self.is_main:
            print(f"deepspeed config{' (' + cfg.deepspeed_config + ')' if cfg.deepspeed_config else ''}: "
                  f"{json.dumps(self.ds_config, sort_keys=True)}", file=sys.stderr)

    # the task builds without tensors (nor AdamW moments: DeepSpeed keeps its own); init draws the params once, on
    # the host, and DeepSpeed moves (at ZeRO-3 partitions) them
    build_device = "meta"

    @property
    def zero_stage(self) -> int:
        return int(self.ds_config.get("zero_optimization", {}).get("stage", 0))

    def init(self, state):
        import deepspeed
        use_tf32(self.device)
        model = state.model
        if next(iter(state.params.values())).is_meta:
            state = state.replace(params=weights.draw(model, state.params, state.seed))
        bind(model, state.params, state.buffers)   # DeepSpeed trains the state's own tensors
        # and only the module holds them: ZeRO-3 partitions them in place, and the whole ones can then go
        state = state.replace(params={}, opt_state={})
        # the model's definition without tensors (on the meta device): ZeRO-3 evaluates through it (eval_state)
        self._twin = copy.deepcopy(model, {id(t): nn.Parameter(t.to("meta"), t.requires_grad) if
                                           isinstance(t, nn.Parameter) else t.to("meta")
                                           for t in [*model.parameters(), *model.buffers()]})
        opt, groups = make_optimizer(self.cfg, model, self.ds_config)
        self.engine, *_ = deepspeed.initialize(model=LossModule(model, state.options.label_smoothing),
                                               optimizer=opt, model_parameters=groups, config=self.ds_config)
        self._own_lr = "scheduler" not in self.ds_config   # a user's DeepSpeed scheduler owns the lr
        self._plain = self.zero_stage == 0 and not self.engine.bfloat16_enabled() and not self.engine.fp16_enabled()
        return self._view(state)

    def _view(self, state):
        """The state's pytree view of the module DeepSpeed trains (live tensors; nothing copied)."""
        model = self.engine.module.model
        # DeepSpeed scales the fp16 loss itself: train_step's scale stays 1
        return state.replace(model=model, params=dict(model.named_parameters()),
                             buffers=dict(model.named_buffers()), opt_state={}, tx=None, loss_scale=1.0,
                             good_steps=0)

    @contextlib.contextmanager
    def eval_state(self, state):
        """The state evaluation sees. At ZeRO-3 the params are partitioned and DeepSpeed's hooks gather them in
        every forward, a collective: ranks evaluating different numbers of batches or decoding steps would wait
        for each other forever. So evaluation gathers every param once (each rank then holds the whole model, in
        the training dtype) and runs the model's hook-free twin over them, with no collective until it ends."""
        if self.zero_stage < 3:
            yield state
            return
        import deepspeed
        params = list(state.params.values())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield state.replace(model=self._twin, params={k: p.data for k, p in state.params.items()})

    def num_params(self, state) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in state.params.values())   # ZeRO-3: partitioned

    def step(self, state, batch):
        """train_step, with DeepSpeed's backward (it reduces, and from ZeRO-2 partitions, the gradients) and its
        update (clipping, loss scaling, the optimizer step)."""
        microbatches = batch if isinstance(batch, (list, tuple)) else [batch]
        gas = self.engine.gradient_accumulation_steps()
        if len(microbatches) != gas:
            raise ConfigError(f"grad_accum: the DeepSpeed config accumulates {gas} micro-batches, the loop gave "
                              f"{len(microbatches)}")
        return train_step(state, microbatches, donate=True, grads_fn=self._backward, sum_fn=self.reduce_sum,
                          stream=self.rank, update_fn=self._update)

    def _backward(self, state, microbatches, scale, seeds):
        """Forward and backward of each micro-batch through DeepSpeed. It averages over micro-batches and ranks,
        and train_step's normalisation is a sum over the global batch: the factor undoes the average."""
        scale = scale * (len(microbatches) * self.world_size)
        loss_sum = 0.0
        for i, (mb, seed) in enumerate(zip(microbatches, seeds)):
            torch.manual_seed(seed)
            ls, _ = self.engine(mb)
            self.engine.backward(ls * scale)
            if i < len(microbatches) - 1:
                self.engine.step()   # DeepSpeed counts micro-batches; it updates only at the last (in _update)
            loss_sum = loss_sum + ls.detach().float()
        return {}, loss_sum

    def _update(self, state, lr):
        """DeepSpeed's update: (grad norm, applied, lr). DeepSpeed skips a step whose gradients are not finite
        (its overflow check under bf16/fp16, the norm check of ZeRO 1-3); a ZeRO-0 fp32 run hands the gradients to
        our torch optimizer as they are, so that check is made here: DeepSpeed's step runs (its counters move on)
        over zeroed gradients, with the optimizer's update left out. DeepSpeed reads its own norm on the host:
        reading `applied` waits for nothing more."""
        opt = self.engine.optimizer
        if self._own_lr:
            for g in opt.param_groups:
                g["lr"] = lr
        else:   # a user's DeepSpeed scheduler owns the lr
            lr = self.engine.get_lr()[0]
        norm, finite = None, True
        if self._plain:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = tree.global_norm(grads)
            finite = bool(torch.isfinite(norm))
        if finite:
            self.engine.step()
        else:
            torch._foreach_zero_(grads)   # DeepSpeed's clipping reads them
            opt.step = lambda *a, **k: None   # this instance only, for this one call
            try:
                self.engine.step()
            finally:
                del opt.step
        if norm is None:   # a tensor or a Python number, as DeepSpeed keeps it
            norm = self.engine.get_global_grad_norm()
            norm = torch.as_tensor(float("nan") if norm is None else norm).detach().float().reshape(())
        return norm, finite and self.engine.was_step_applied(), lr

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
        known = self._hash_own(staging)
        if self.is_main:
            files = {n: (lambda dst, src=os.path.join(staging, n): os.replace(src, dst)) for n in os.listdir(staging)}
            checkpoint.save(state, run_dir, keep=keep, extra=extra, write_tensors=False, files=files, known=known)
            shutil.rmtree(staging, ignore_errors=True)
        dist.barrier()   # nobody reads or prunes checkpoints while rank 0 writes one
        return checkpoint.step_dir(run_dir, state.step)   # on every rank: error messages name it alike

    def _hash_own(self, staging: str) -> dict:
        """Manifest entries, each rank hashing and fsyncing the shards it wrote (DeepSpeed names them
        `zero_pp_rank_<rank>_...`) and rank 0 the rest, in parallel: a save costs one rank's files, not all."""
        mine = {}
        for dirpath, _, names in os.walk(staging):
            for n in names:
                owner = re.search(r"zero_pp_rank_(\d+)_", n)
                if (int(owner.group(1)) if owner else 0) % self.world_size == self.rank:
                    path = os.path.join(dirpath, n)
                    mine[os.path.relpath(path, staging)] = checkpoint.file_entry(path)
        every = [None] * self.world_size
        dist.all_gather_object(every, mine)   # small: names, sizes, checksums
        return {k: v for entries in every for k, v in entries.items()}

    def restore(self, state, paths):
        """Rank 0 picks the newest complete DeepSpeed checkpoint among `paths` (verified against its manifest;
        damaged ones are skipped with a warning); every rank then loads its shards from it."""
        pick = [None, None]   # path, error
        if self.is_main:
            for p in paths:
                try:
                    if not checkpoint.inside_run(p, self.cfg.run_dir):   # the one place we unpickle: our own files
                        raise checkpoint.CheckpointError(
                            f"{p}: not loaded: DeepSpeed's shard files are pickles, loaded only from this run's own "
                            f"{checkpoint.root_of(self.cfg.run_dir)}/ (copy it there if you trust it)")
                    checkpoint.verify(p)
                    if not os.path.isfile(os.path.join(p, "latest")):
                        raise checkpoint.CheckpointError(f"{p}: not a DeepSpeed checkpoint (written by another "
                                                         "engine: resume it with that engine, or start over)")
                    pick[0] = p
                    break
                except checkpoint.CheckpointError as e:
                    print(f"warning: skipping checkpoint: {e}", file=sys.stderr)
            if paths and pick[0] is None:
                pick[1] = str(checkpoint.none_complete(paths, self.cfg.resume))
        dist.broadcast_object_list(pick, src=0)
        if pick[1]:
            raise checkpoint.CheckpointError(pick[1])
        if pick[0] is None:
            return state, None, None
        try:
            loaded, _ = self.engine.load_checkpoint(pick[0], load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        except RuntimeError as e:   # torch's load_state_dict: a checkpoint of another model shape, on every rank
            detail = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            if not str(e).startswith("Error(s) in loading state_dict") or not detail:
                raise
            raise checkpoint.incompatible(checkpoint.IncompatibleCheckpoint(f"{pick[0]}: {detail[0].rstrip('.')}"),
                                          self.cfg.resume) from None
        if loaded is None:
            raise checkpoint.CheckpointError(f"{pick[0]}: DeepSpeed could not load it")
        with open(os.path.join(pick[0], "state.json")) as f:
            meta = json.load(f)
        return self._view(state.with_meta(meta)), meta, pick[0]

    def _drop(self):
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None
