"""The fit loop: batches -> engine.step -> every part after the step. Reads top to bottom.

What happens around the steps (the train lines, evaluations, checkpoints, stops) is decided by the parts
(thcore/parts.py), each on its own cadence; the run's start (restore, run directory) is thcore/start.py."""
import os

from . import faults
from .data.loader import step_batches
from .parts import poll, standard
from .profiler import Profiler
from .start import begin


class Interrupted(KeyboardInterrupt):
    """Raised after a stop request (Ctrl-C, SIGTERM) once the current step finished and a checkpoint is saved."""


def fit(cfg, task, engine, launch: dict | None = None, parts=()):
    """Train `task` with `engine` as `cfg` says; resumes from the run directory's latest checkpoint.

    `parts`: extra parts.Part objects, acting after the standard ones that report and evaluate and before those
    that stop and checkpoint (whose checkpoints carry their state). `launch`: {"recipe": path}, recorded in
    launches.jsonl. Nothing in the run directory changes until the start has succeeded."""
    run = begin(cfg, task, engine, launch)
    run.parts = standard(run, parts)
    profiler = Profiler(os.path.join(cfg.run_dir, "profile"), cfg.profile_steps, enabled=cfg.profile and
                        engine.is_main, log=run.say)
    batches = step_batches(task, engine, cfg.grad_accum, run.state.data)
    try:
        for part in run.parts:
            part.start(run)
        with profiler:
            while run.stop is None:   # set by a part: max steps, a stop request, the time budget, early stopping
                run.batch, run.current = next(batches), run.step + 1
                run.state, run.out = engine.step(run.state, run.batch.micro)
                run.state = run.state.replace(data=run.batch.after)
                profiler.step()
                for part, answers in zip(run.parts, poll(run, run.parts)):
                    part.after_step(run, answers)
        for part in run.parts:
            part.end(run)
    except (RuntimeError, MemoryError) as e:   # out of memory, a lost peer: one line naming the step
        why = faults.explain(e, cfg, engine.world_size, run.current)
        if why is None:
            raise
        raise why from e
    finally:
        for part in run.parts:
            part.close(run)
        run.metrics.close()
    if run.stop == "signal":
        run.say(f"stopped at step {run.step}; run the same command again to resume")
        raise Interrupted(run.step)
    return run.state
