"""What every multi-process engine (ddp, fsdp, deepspeed) shares, written once: torchrun's environment, the
device of this rank, the process group (with the store keys of each restart attempt apart), rank and world
size, the sum over ranks, and the tear-down. An engine subclasses Runtime and adds how it computes and reduces
gradients and where it holds the state. `Engine` is the protocol every engine (eager included) follows, with the
defaults most of them keep."""
import contextlib
import datetime
import gc
import os

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..func import num_params, pick_device

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
    previous attempt and fail with "Connection refused" (seen in tests/integration/test_faults.py). On one node every worker
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


class Engine:
    """What the fit loop calls on an engine (docs/ARCHITECTURE.md, "The engine protocol"). Subclasses define
    init, step, save and restore; the rest has these defaults (one process, whole params)."""
    name = ""
    rank, world_size, is_main = 0, 1, True
    device = torch.device("cpu")

    def reduce_sum(self, t):
        return t

    def eval_state(self, state):
        """The state evaluation and decoding see (engines whose params are partitioned gather them here)."""
        return contextlib.nullcontext(state)

    def num_params(self, state) -> int:
        return num_params(state.params)

    def wait_saves(self) -> None:
        """Return once every checkpoint `save` started is complete (raising a failed one's error)."""

    def close(self, clean: bool = True):
        pass


class Runtime(Engine):
    """One rank of a torchrun job. `start()` joins (or creates) the process group once the engine's own checks
    have passed; `close()` leaves it."""

    def __init__(self, cfg, what: str):
        check_torchrun_env(what)
        self.cfg = cfg
        self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.is_main = self.rank == 0
        self.backend, self.device = backend_and_device(cfg.device, self.local_rank)
        self._own_group = False

    @property
    def build_device(self):
        """Where the task draws the initial params (thcore/weights.py: one at a time, straight to this rank's
        device); an engine that places them itself says "meta" (FSDP) or "cpu" (DeepSpeed)."""
        return self.device

    def start(self, bind_device: bool = True):
        """The process group; `bind_device`: tell NCCL this rank's GPU up front (DeepSpeed binds it itself)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        self._own_group = not dist.is_initialized()   # a caller's process group outlives this engine
        if self._own_group:
            # the timeout bounds every collective: a dead or stuck peer ends the run instead of hanging it
            init_process_group(self.backend, self.cfg.dist_timeout_s,
                               device_id=self.device if cuda and bind_device else None)

    def reduce_sum(self, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    def _drop(self):
        """The engine's objects that use the process group (DDP's reducer, DeepSpeed's engine), let go first."""

    def close(self, clean: bool = True):
        """Tear down (docs/ARCHITECTURE.md, "Facts"). `clean=False` after an error: this rank may have failed
        alone, and waiting at a barrier for peers that never come would hang the job (torchrun stops the others)."""
        if not dist.is_initialized():
            return
        if clean:
            dist.barrier()
        self._drop()
        gc.collect()
        if self._own_group:
            dist.destroy_process_group()
