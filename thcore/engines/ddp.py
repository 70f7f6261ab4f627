"""The DDP engine: one process per device under torchrun, gradients averaged by torch's DistributedDataParallel
reducer (bucketed, overlapped with backward, optionally compressed by a comm hook).

train_step's math is unchanged: DDP only replaces *how the gradients are computed*. The module DDP wraps owns
the state's params themselves (each `nn.Parameter` shares the state tensor's storage), so the in-place optimizer
update in train_step is what DDP sees on the next forward. Gradients come from `.backward()` through the DDP
module, never `torch.autograd.grad`: DDP's reducer only runs from `.backward()`, and with `autograd.grad` every
rank would silently keep its local gradients (docs/ARCHITECTURE.md, "Facts").

Params are replicated, so a checkpoint (written by rank 0) is world-size independent.
"""
import contextlib
import inspect

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from ..func import bind
from ..config import ConfigError
from ..step import LossModule, autocast, loss_fn, train_step  # noqa: F401  (loss_fn: tests/recipes/fault_recipe.py patches it here)
from . import use_tf32
from .runtime import Runtime

def bf16_compress_hook_gloo(process_group, bucket):
    """torch's bf16_compress_hook, same math: DDP refuses that hook (by name) unless NCCL >= 2.10 is present,
    but gloo all-reduces bf16 tensors itself (torch 2.13), so the bucket really travels and sums in bf16."""
    group = process_group if process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(group.size())

    def decompress(fut):
        buffer.copy_(fut.value()[0])
        return buffer
    return dist.all_reduce(compressed, group=group, async_op=True).get_future().then(decompress)


def comm_hook(cfg, backend: str):
    """(hook state, hook) for `cfg.ddp_comm_hook`; (None, None) = DDP's built-in all-reduce."""
    name = cfg.ddp_comm_hook
    if name == "allreduce":
        return None, None
    if name == "fp16_compress":
        return None, default_hooks.fp16_compress_hook
    if name == "bf16_compress":
        return None, default_hooks.bf16_compress_hook if backend == "nccl" else bf16_compress_hook_gloo
    if cfg.powersgd_start_iter < 2:   # torch needs two plain iterations to set up error feedback / warm start
        raise ConfigError(f"powersgd_start_iter={cfg.powersgd_start_iter}: must be >= 2 with ddp_comm_hook='powersgd'")
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=cfg.powersgd_rank,
                                        start_powerSGD_iter=cfg.powersgd_start_iter)
    return state, powerSGD_hook.powerSGD_hook


class DDPEngine(Runtime):
    name = "ddp"

    def __init__(self, cfg):
        super().__init__(cfg, "engine='ddp'")
        self.start()
        self.ddp = self.forward = self.params = self._hook_state = None
        self.saver = checkpoint.Saver(background=cfg.async_checkpoint)   # rank 0's

    def init(self, state):
        state = state.to(self.device)
        use_tf32(self.device)
        self.params = bind(state.model, state.params, state.buffers)
        # buffers (the sinusoidal table) are constants: no re-broadcast before every forward
        # (torch 2.13 renamed broadcast_buffers to forward_sync_buffers)
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        # gradient_as_bucket_view: .grad lives in DDP's buckets, no copy between them. DDP wraps the model *with*
        # its loss: compiled, the fp32 cast and the cross-entropy join the model's graph (no eager [B*T, vocab]
        # fp32 log-probs between them); with ce_chunk the output layer and the loss run fused, in that module
        opts = state.options
        self.ddp = DistributedDataParallel(
            LossModule(state.model, opts.label_smoothing, opts.ce_chunk),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb, gradient_as_bucket_view=True, **no_buffer_sync)
        self._hook_state, hook = comm_hook(self.cfg, self.backend)
        if hook is not None:
            self.ddp.register_comm_hook(self._hook_state, hook)
        # compiling the DDP module is torch's supported way (dynamo splits graphs at bucket boundaries);
        # no_sync() and the reducer still act on self.ddp
        self.forward = torch.compile(self.ddp) if opts.compile else self.ddp
        self._bound = state.params
        return state

    def _grads(self, state, microbatches, scale, seeds):
        """train_step's `grads_fn`: sum over micro-batches of d(loss_sum * scale)/d(params), over all ranks.

        DDP averages over ranks, and `scale` already divides by the *global* token count (train_step's
        `sum_fn`), so the loss is multiplied by world_size: the result is the global-token mean, exactly."""
        if state.params is not self._bound:
            raise RuntimeError("DDPEngine.step: state.params are not the tensors engine.init/restore returned "
                               "(DDP's module owns those); pass the state the engine gave back")
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)   # in place: .grad stays a view into DDP's buckets
        opts, last = state.options, len(microbatches) - 1
        loss_sum = 0.0
        for i, (mb, seed) in enumerate(zip(microbatches, seeds)):
            torch.manual_seed(seed)
            # accumulate locally; the reducer all-reduces once, in the last micro-batch's backward
            with self.ddp.no_sync() if i < last else contextlib.nullcontext():
                with autocast(opts.precision, self.device):
                    ls, _ = self.forward(mb)   # train_step's loss_fn, inside the DDP module
                (ls * (scale * self.world_size)).backward()
            loss_sum = loss_sum + ls.detach()
        return {k: p.grad for k, p in self.params.items()}, loss_sum

    def step(self, state, batch):
        return train_step(state, batch, donate=True, grads_fn=self._grads, sum_fn=self.reduce_sum,
                          stream=self.rank)   # per-rank dropout masks, derived from (seed, step, micro, rank)

    def _check_replicas(self, state):
        """DDP keeps replicas bitwise equal; a checkpoint of rank 0 stands for every rank only if that holds."""
        fp = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in state.params.values()])
        every = [torch.empty_like(fp) for _ in range(self.world_size)]
        dist.all_gather(every, fp)
        for r, other in enumerate(every):
            if not torch.equal(other, every[0]):
                name = list(state.params)[int((other != every[0]).any(1).nonzero()[0])]
                raise RuntimeError(f"DDP replicas diverged: rank {r}'s {name!r} differs from rank 0's")

    def save(self, state, run_dir, keep=3, extra=None):
        self._check_replicas(state)
        if self.is_main:
            self.saver.save(state, run_dir, keep=keep, extra=extra)
        if not self.saver.background:
            dist.barrier()   # nobody reads or prunes checkpoints while rank 0 writes one
        return checkpoint.step_dir(run_dir, state.step)   # on every rank: error messages name it alike

    def wait_saves(self):
        if not self.saver.background:
            return
        try:
            if self.is_main:
                self.saver.wait()
        finally:
            dist.barrier()   # every rank returns once the checkpoint is complete

    def restore(self, state, paths):
        """Every rank loads the same files, into the tensors DDP's module owns."""
        quiet = (lambda *a, **k: None)   # noqa: E731
        new, meta, path = checkpoint.restore(state, paths, log=print if self.is_main else quiet,
                                             resume=self.cfg.resume)
        if path is None:
            return state, None, None
        with torch.no_grad():
            for k, t in state.params.items():
                t.copy_(new.params[k])
        if isinstance(self._hook_state, powerSGD_hook.PowerSGDState):
            # count training steps, not this process's, but leave the 2 plain iterations PowerSGD needs while DDP
            # rebuilds its buckets; its error feedback and warm-start memories (per rank) start afresh
            self._hook_state.iter = min(new.step, self._hook_state.start_powerSGD_iter - 2)
        return new.replace(params=state.params), meta, path

    def _drop(self):
        self.ddp = self.forward = None   # the reducer goes before the process group it uses
