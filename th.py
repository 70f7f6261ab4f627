#!/usr/bin/env python
"""torch-handle command line (fire).

    python th.py run recipes/single_translation.py [--field=value ...]
    python th.py bench [--steps=30 ...]     # functional core vs. a plain nn.Module + torch.optim loop
"""
import fire

from thcore.cli import guarded


def run(recipe: str, **overrides):
    """Train with RECIPE; any config field can be overridden with --field=value."""
    from thcore.recipe import configure

    def go():
        cfg, mod = configure(recipe, overrides)
        launcher = getattr(mod, "launcher", "single")
        if launcher == "single" and cfg.engine == "eager":
            from launchers.single import main
            return main(cfg, mod.build)
        from launchers.spawn import spawn   # ddp / deepspeed: start one process per device under torchrun
        return spawn(recipe, cfg, overrides)
    guarded(go)


def bench(**kwargs):
    """Time the functional train_step against the same model as a plain nn.Module + torch.optim loop."""
    from thcore.bench import main
    guarded(main, **kwargs)


if __name__ == "__main__":
    fire.Fire({"run": run, "bench": bench})
