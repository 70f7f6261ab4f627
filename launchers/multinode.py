"""One process of a torchrun job (engine="ddp" or "deepspeed"): what `python th.py run RECIPE` starts once per
device, and what you start yourself on each node:

    torchrun --nproc_per_node=8 launchers/multinode.py --recipe recipes/ddp_translation.py --epochs=10 --batch_size=32
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST0 --master_port=29500 --nproc_per_node=8 \\
        launchers/multinode.py --recipe recipes/ddp_translation.py          # and --node_rank=1 on the other node
    torchrun --nnodes=2 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 --rdzv_id=JOB --nproc_per_node=8 \\
        launchers/multinode.py --recipe recipes/ddp_translation.py

`batch_size` is per device: the global batch is batch_size x world_size x grad_accum (printed at start).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thcore.config import ConfigError  # noqa: E402
from thcore.engines import make_engine  # noqa: E402
from thcore.loop import Interrupted, fit  # noqa: E402


def main(cfg, build, recipe: str | None = None):
    if cfg.engine == "eager":
        raise ConfigError("engine='eager' trains in one process; under torchrun use --engine=ddp (or deepspeed), "
                          "or run it with `python th.py run RECIPE`")
    engine = make_engine(cfg)
    try:
        state = fit(cfg, build(cfg), engine, launch={"recipe": recipe})
    except Interrupted:   # every rank agreed to stop at the same step: they still meet at the exit barrier
        engine.close()
        raise
    except BaseException:
        engine.close(clean=False)   # this rank may have failed alone: no barrier; torchrun stops the others
        raise
    engine.close()
    return state


if __name__ == "__main__":
    import fire

    from thcore.cli import run_launcher
    from thcore.engines.runtime import check_torchrun_env

    try:   # before anything else: without torchrun's environment the first collective would hang or crash
        check_torchrun_env("launchers/multinode.py")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        fire.Fire(lambda recipe, **overrides: run_launcher(main, recipe, overrides))
    except SystemExit as e:
        if e.code in (0, None):
            raise
        # a failed or stopped rank leaves at once: its checkpoint and logs are closed by now, and Python's own
        # finalization of a torch process whose peer died took 3-4 s more on 2 CPU cores (measured)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)
