"""TrainState: everything a training step reads and writes, as one attrs object (Flax-style).

Dynamic parts (checkpointed): params, opt_state, step, seed, data cursor, fp16 loss scale. What the loop keeps
about the run (the best eval, the time trained) belongs to the loop's parts (thcore/parts.py), not here.
Static parts (rebuilt from the recipe, never checkpointed): the model definition, its buffers, the optimizer,
the learning-rate schedule and the step options.
"""
from typing import Any, Callable

import attrs
from torch import nn

from . import func, tree, weights
from .optim import AdamW, schedule


@attrs.frozen(kw_only=True)
class StepOptions:
    precision: str = "fp32"          # fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scale)
    clip_grad: float = 1.0           # global-norm clipping; 0 = off
    label_smoothing: float = 0.0
    compile: bool = False            # torch.compile the forward+backward of a micro-batch
    loss_scale_growth_interval: int = 2000
    ema_decay: float = 0.0           # > 0: keep TrainState.ema, an EMA of the params updated after each step
    # speed switches (docs/PERFORMANCE.md); each runs on CPU too, so CI exercises its code path
    ce_chunk: int = 0                # > 0: output layer + cross-entropy fused, this many tokens at a time
    sdpa_backend: str = "auto"       # attention kernel tried first: auto | flash | efficient | cudnn | math
    cuda_graphs: bool = False        # compile=True with mode="reduce-overhead" (CUDA graphs; nothing to capture on CPU)


def speed_options(cfg) -> dict:
    """The StepOptions fields a run config sets beyond precision/clipping (tasks pass them through)."""
    return {"compile": cfg.compile, "ce_chunk": cfg.ce_chunk, "sdpa_backend": cfg.sdpa_backend,
            "cuda_graphs": cfg.cuda_graphs}


@attrs.define(kw_only=True)
class TrainState:
    params: dict
    opt_state: dict
    step: int = 0
    seed: int = 0                    # root of every random stream: dropout per (step, micro, rank), data order per epoch
    data: dict = attrs.Factory(lambda: {"epoch": 0, "index": 0})   # cursor: micro-batches consumed in this epoch
    loss_scale: float = 1.0
    good_steps: int = 0              # finite fp16 steps since the loss scale last changed
    ema: dict | None = None          # EMA of the params (options.ema_decay > 0), checkpointed as ema.safetensors
    # static
    model: nn.Module = attrs.field(eq=False, repr=False)
    buffers: dict = attrs.field(eq=False, repr=False)
    tx: Any = attrs.field(eq=False, repr=False)
    lr_fn: Callable[[int], float] = attrs.field(eq=False, repr=False)
    options: StepOptions = attrs.field(factory=StepOptions, eq=False)

    def replace(self, **changes) -> "TrainState":
        return attrs.evolve(self, **changes)

    def clone(self) -> "TrainState":
        """A copy whose tensors can be updated in place without touching this one."""
        return self.replace(params=tree.clone(self.params), opt_state=tree.clone(self.opt_state),
                            data=dict(self.data), ema=tree.clone(self.ema))

    def to(self, device) -> "TrainState":
        move = lambda t: t.to(device)   # noqa: E731
        return self.replace(params=tree.tree_map(move, self.params), opt_state=tree.tree_map(move, self.opt_state),
                            buffers=tree.tree_map(move, self.buffers),
                            ema=None if self.ema is None else tree.tree_map(move, self.ema))

    # what a checkpoint's state.json holds
    def meta(self) -> dict:
        # the fp16 scale may be a device tensor (step.py keeps it there on accelerators): read at save time only
        return {"step": self.step, "seed": self.seed, "data": dict(self.data), "loss_scale": float(self.loss_scale),
                "good_steps": int(self.good_steps)}

    def with_meta(self, meta: dict) -> "TrainState":
        return self.replace(step=int(meta["step"]), seed=int(meta["seed"]), data=dict(meta["data"]),
                            loss_scale=float(meta["loss_scale"]), good_steps=int(meta["good_steps"]))


def init_state(model, tx=None, *, seed: int = 0, lr: float | Callable[[int], float] = 3e-4,
               options: StepOptions | None = None, device="cpu") -> TrainState:
    """A fresh TrainState.

    `model` is an nn.Module (its own tensors become the params), or a zero-argument callable that builds one:
    it is then built on the meta device and each parameter drawn on its own, a function of (`seed`, its name)
    alone (thcore/weights.py), straight onto `device`; `device="meta"` leaves them for the engine to place
    (FSDP: shard by shard). `lr` is a float or a schedule `step -> lr`.
    """
    if isinstance(model, nn.Module):
        params, buffers = func.init(model)
        params = {k: v.to(device) for k, v in params.items()}
        buffers = {k: v.to(device) for k, v in buffers.items()}
    else:
        model, params, buffers = weights.build(model, seed, device)
    tx = tx or AdamW()
    options = options or StepOptions()
    return TrainState(params=params, opt_state=tx.init(params), seed=seed, model=model, buffers=buffers, tx=tx,
                      lr_fn=lr if callable(lr) else schedule("constant", lr), options=options,
                      ema=tree.clone(params) if options.ema_decay > 0 else None,
                      loss_scale=2.0 ** 16 if options.precision == "fp16" else 1.0)
