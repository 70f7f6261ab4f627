"""Engine adapters around the same train_step. Each differs only in how gradients are computed and reduced
and where state lives:

    engine.init(state) -> state                 place the state on the engine's device(s)
    engine.step(state, batch) -> (state, metrics)
    engine.reduce_sum(tensor) -> tensor         sum over ranks (eval metrics, logged losses)
    engine.save(state, run_dir, keep, extra) / engine.restore(state, paths)
    engine.close()                              multi-process engines: close(clean=False) after an error skips
                                                the exit barrier (a rank that failed alone must not wait there)
"""


def make_engine(cfg):
    if cfg.engine == "eager":
        from .eager import EagerEngine
        return EagerEngine(cfg)
    if cfg.engine == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(cfg)
    from .deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(cfg)
