"""What every entry point shares: bad input becomes one line on stderr and exit status 2; a graceful stop
exits 130 after its checkpoint."""
import sys

from .config import ConfigError
from .loop import Interrupted


def guarded(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
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
