"""What every entry point shares: bad input becomes one line on stderr and exit status 2; a run that cannot go on
(thcore/faults.py) one line and status 3; a graceful stop exits 130 after its checkpoint."""
import sys

from .config import ConfigError
from .faults import TrainingAborted
from .loop import Interrupted


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except TrainingAborted as e:   # a non-finite step under nan_policy="stop", out of memory, a lost peer
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted:
        sys.exit(130)


def run_launcher(main, recipe: str, overrides: dict):
    """Load `recipe` with `overrides` and hand the config to a launcher's `main(cfg, build)`."""
    from .recipe import configure

    def go():
        cfg, mod = configure(recipe, overrides)
        main(cfg, mod.build)
    guarded(go)
