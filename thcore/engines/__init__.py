"""Engine adapters around the same train_step. Each differs only in how gradients are computed and reduced
and where state lives:

    engine.init(state) -> state                 place the state on the engine's device(s)
    engine.step(state, batch) -> (state, metrics)
    engine.reduce_sum(tensor) -> tensor         sum over ranks (eval metrics, logged losses)
    engine.save(state, run_dir, keep, extra) / engine.restore(state, paths)
    engine.eval_state(state), engine.num_params(state)
    engine.close()                              multi-process engines: close(clean=False) after an error skips
                                                the exit barrier (a rank that failed alone must not wait there)

runtime.Engine holds the defaults of one process.
"""


def make_engine(cfg):
    if cfg.engine == "eager":
        from .eager import EagerEngine
        return EagerEngine(cfg)
    if cfg.engine == "ddp":
        from .ddp import DDPEngine
        return DDPEngine(cfg)
    if cfg.engine == "fsdp":
        from .fsdp import FSDPEngine
        return FSDPEngine(cfg)
    from .deepspeed import DeepSpeedEngine
    return DeepSpeedEngine(cfg)


def use_tf32(device) -> None:
    """fp32 matmuls and convolutions on TF32 tensor cores on a GPU (~7x the fp32 rate on an H100, 10-bit
    mantissa products with fp32 accumulation, as torch's own autocast-free training recipes use). bf16/fp16
    autocast is unaffected. On a CPU nothing changes."""
    import torch
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
