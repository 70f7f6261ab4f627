"""What every entry point shares: bad input becomes one line on stderr and exit status 2; a run that cannot go on
(thcore/faults.py) one line and status 3; a graceful stop exits 130 after its checkpoint.

Under torchrun every rank usually meets the same bad input (each reads the same files) and a rank whose peer
failed then loses contact with it: the job's first error line is the cause, so only that one is printed, once
(the ranks agree through torchrun's own store, which outlives the workers)."""
import datetime
import os
import sys

from .config import ConfigError, PeerFailed
from .faults import TrainingAborted
from .loop import Interrupted


def _job_store():
    """(torchrun's own store, the first-error key of this attempt), or None outside torchrun's agent (ranks
    started by hand keep their store in rank 0's process: it dies with it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=5))
    return store, f"torch_handle/first_error/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _first_error() -> bool:
    """Is this the first error of this torchrun job (attempt)? True outside torchrun or without its store."""
    rank = os.environ.get("RANK", "0")
    try:
        found = _job_store()
        if found is None:
            return True
        store, key = found
        # the first caller sets the key; later ones read the first one's rank back
        return store.compare_set(key, "", rank) == rank.encode()
    except Exception:   # no store to agree through (it is gone, or this is no torchrun job): say it anyway
        return True


def _wait_for_the_cause(timeout_s: float = 60.0) -> None:
    """A rank that stops because a peer failed (PeerFailed) leaves once that peer has printed the cause: torchrun
    stops the whole group as soon as one worker exits, which could cut the cause off."""
    try:
        found = _job_store()
        if found is not None:
            found[0].wait([found[1]], datetime.timedelta(seconds=timeout_s))
    except Exception:   # the store is gone or the peer died silently: nothing left to wait for
        pass


def report(line: str) -> None:
    """Print one `error:` line on stderr, unless another rank of the same job already printed the cause."""
    if _first_error():
        print(f"error: {line}", file=sys.stderr, flush=True)


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TrainingAborted as e:   # a non-finite step under nan_policy="stop", out of memory, a lost peer
        report(str(e))
        sys.exit(3)
    except ConfigError as e:
        if isinstance(e, PeerFailed):
            _wait_for_the_cause()
        else:
            report(str(e))
        sys.exit(2)
    except Interrupted:
        sys.exit(130)


def run_launcher(main, recipe: str, overrides: dict):
    """Load `recipe` with `overrides` and hand the config to a launcher's `main(cfg, build, recipe)`."""
    from .recipe import configure

    def go():
        cfg, mod = configure(recipe, overrides)
        main(cfg, mod.build, recipe)
    guarded(go)
