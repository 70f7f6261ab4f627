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
import datetime
import gc
import inspect
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from .. import checkpoint
from ..config import ConfigError
from ..func import pick_device
from ..step import LossModule, autocast, loss_fn, train_step  # noqa: F401  (loss_fn: tests/fault_recipe.py patches it here)
from . import use_tf32

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
LAUNCH_HINT = ("launch it with torchrun: `python th.py run RECIPE` starts torchrun for you (one process per GPU, "
               "--nproc=N on CPU); by hand: `torchrun --nproc_per_node=N launchers/multinode.py --recipe RECIPE "
               "[--field=value ...]`")


def check_torchrun_env(what: str = "engine='ddp'"):
    """A clear error instead of a hang or a stack trace when torchrun's environment is missing."""
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise ConfigError(f"{what} runs one process per device under torchrun, but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set: {LAUNCH_HINT}")


def init_process_group(backend: str, timeout_s: float, device_id=None):
    """dist.init_process_group, with the store keys of each torchrun attempt kept apart on a single node.

    torchrun keeps one TCPStore for the whole job (static and c10d rendezvous alike), and the keys the workers
    write carry no attempt number: after a restart a rank could read the address a dead peer published in the
    previous attempt and fail with "Connection refused" (seen in tests/test_faults.py). On one node every worker
    has the same TORCHELASTIC_RESTART_COUNT, so it prefixes the keys; across nodes the agents may count restarts
    differently (a membership change is not counted), so there torch's own behaviour is kept."""
    timeout = datetime.timedelta(seconds=timeout_s)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    single_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not single_node:
        return dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)   # a client of the agent's store, as torch's env:// does
    dist.init_process_group(backend, store=dist.PrefixStore(f"torch_handle/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=world_size, timeout=timeout,
                            device_id=device_id)


def backend_and_device(device: str, local_rank: int) -> tuple[str, torch.device]:
    """The only difference between the CUDA and the CPU path: NCCL on the GPU numbered LOCAL_RANK, or gloo."""
    if pick_device(device).type == "cuda":
        n = torch.cuda.device_count()
        if 0 < n <= local_rank:   # e.g. 2 processes on a 1-GPU machine: rank 1 would ask for cuda:1 and crash
            raise ConfigError(f"device={device!r}: this process has LOCAL_RANK={local_rank} but the machine shows "
                              f"{n} GPU{'s' if n > 1 else ''}; start at most {n} process{'es' if n > 1 else ''} "
                              f"per node (--nproc={n}), or use device='cpu'")
        return "nccl", torch.device("cuda", local_rank)
    return "gloo", torch.device("cpu")


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


def bind(model: nn.Module, params: dict, buffers: dict) -> dict:
    """Make `model`'s parameters and buffers *be* the state's tensors (shared storage, tied weights kept tied).

    Returns {name: nn.Parameter}: where DDP leaves the gradients (`.grad`)."""
    new = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        mod, _, leaf = name.rpartition(".")
        if id(p) not in new:   # tied weights: the first name is the one in `params` (named_parameters' dedup)
            new[id(p)] = nn.Parameter(params[name])   # a Parameter around a tensor shares its storage
        setattr(model.get_submodule(mod), leaf, new[id(p)])
    for name, b in buffers.items():
        mod, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(mod), leaf, b)   # an existing buffer name: stays a (non-)persistent buffer
    bound = dict(model.named_parameters())
    assert bound.keys() == params.keys() and all(bound[k].data_ptr() == t.data_ptr() for k, t in params.items())
    return bound


class DDPEngine:
    name = "ddp"

    def __init__(self, cfg):
        check_torchrun_env()
        self.cfg = cfg
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        self.backend, self.device = backend_and_device(cfg.device, self.local_rank)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        # the timeout bounds every collective: a dead or stuck peer ends the run instead of hanging it
        init_process_group(self.backend, cfg.dist_timeout_s, device_id=self.device if cuda else None)
        self.ddp = self.forward = self.params = self._hook_state = None

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
        # fp32 log-probs between them)
        self.ddp = DistributedDataParallel(
            LossModule(state.model, state.options.label_smoothing), device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=self.cfg.bucket_cap_mb, gradient_as_bucket_view=True, **no_buffer_sync)
        self._hook_state, hook = comm_hook(self.cfg, self.backend)
        if hook is not None:
            self.ddp.register_comm_hook(self._hook_state, hook)
        # compiling the DDP module is torch's supported way (dynamo splits graphs at bucket boundaries);
        # no_sync() and the reducer still act on self.ddp
        self.forward = torch.compile(self.ddp) if state.options.compile else self.ddp
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

    def reduce_sum(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

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
        path = checkpoint.save(state, run_dir, keep=keep, extra=extra) if self.is_main else None
        dist.barrier()   # nobody reads or prunes checkpoints while rank 0 writes one
        return path

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

    def barrier(self):
        dist.barrier()

    def close(self, clean: bool = True):
        """Tear down (docs/ARCHITECTURE.md, "Facts"). `clean=False` after an error: this rank may have failed alone, and waiting
        at a barrier for peers that never come would hang the job (torchrun stops the others)."""
        if not dist.is_initialized():
            return
        if clean:
            dist.barrier()
        self.ddp = self.forward = None   # drop the reducer before the process group it uses
        gc.collect()
        dist.destroy_process_group()
