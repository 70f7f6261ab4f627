"""One process, one device: `python launchers/single.py --recipe recipes/x.py [--field=value ...]`
(what `python th.py run` calls for recipes whose launcher is "single")."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thcore.engines import make_engine  # noqa: E402
from thcore.loop import fit  # noqa: E402


def main(cfg, build, recipe: str | None = None):
    engine = make_engine(cfg)
    try:
        return fit(cfg, build(cfg), engine, launch={"recipe": recipe})
    finally:
        engine.close()


if __name__ == "__main__":
    import fire

    from thcore.cli import run_launcher
    fire.Fire(lambda recipe, **overrides: run_launcher(main, recipe, overrides))
