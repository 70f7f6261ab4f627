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


def _first_error() -> bool:
    """Is this the first error of this torchrun job (attempt)? True outside torchrun or without its store."""
    # only torchrun's own store outlives the workers (ranks started by hand keep theirs in rank 0's process)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    rank = os.environ.get("RANK", "0")
    try:
        import torch.distributed as dist
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        key = f"torch_handle/first_error/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        # the first caller sets the key; later ones read the first one's rank back
        return store.compare_set(key, "", rank) == rank.encode()
    except Exception:   # no store to agree through (it is gone, or this is no torchrun job): say it anyway
        return True


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
        if not isinstance(e, PeerFailed):
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
