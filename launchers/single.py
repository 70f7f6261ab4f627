"""One process, one device: `python launchers/single.py --recipe recipes/x.py [--field=value ...]` (what
`python th.py run` starts under torchrun for an eager run with max_restarts > 0; without, it trains in its own
process: thcore/launch.py)."""
import fire

from thcore.cli import run_launcher
from thcore.launch import one_process

if __name__ == "__main__":
    fire.Fire(lambda recipe, **overrides: run_launcher(one_process, recipe, overrides))
