"""Functional optimizers on torch.optim's own kernels, and learning-rate schedules.

An optimizer is a small frozen object: `init(params) -> opt_state` and `update(params, grads, opt_state, lr)`,
which updates `params` and `opt_state` in place with `torch.optim.adamw.adamw` / `torch.optim.sgd.sgd` (bitwise
equal to `torch.optim.AdamW` / `SGD`). Weight decay applies to matrices only (dim >= 2), as in nanoGPT.
"""
import math
import time
from typing import Callable

import attrs
import torch
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd


def _impl(device: torch.device, impl: str) -> dict:
    """foreach on CPU, fused on CUDA (one kernel for all params); 'auto' picks by device. 'fused' runs torch's
    fused kernel on CPU too (torch >= 2.4); 'for_loop' is the reference per-tensor loop. The unfused kernels run
    `capturable` on an accelerator: with the step counts on the device, the non-capturable form reads each one
    back (`.item()` per parameter per step)."""
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    return {"fused": impl == "fused", "foreach": impl == "foreach"}


def _adam_kernel(device: torch.device, impl: str) -> dict:
    kw = _impl(device, impl)
    if not kw["fused"] and device.type != "cpu":
        kw["capturable"] = True
    return kw


def _fused(device: torch.device, impl: str) -> bool:
    return _impl(device, impl)["fused"]


def _groups(params: dict):
    """(decayed names, other names): matrices and embeddings decay; biases and norms do not."""
    decay = [k for k, p in params.items() if p.dim() >= 2]
    no_decay = [k for k, p in params.items() if p.dim() < 2]
    return decay, no_decay


@attrs.frozen(kw_only=True)
class AdamW:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    impl: str = "auto"

    def init(self, params: dict) -> dict:
        return {
            "exp_avg": {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()},
            "exp_avg_sq": {k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()},
            # torch's kernels want one singleton float tensor per param
            "step": {k: torch.zeros((), dtype=torch.float32, device=p.device) for k, p in params.items()},
        }

    def skips_found_inf(self, device: torch.device) -> bool:
        """Does `update` take `found_inf` / `grad_scale` on `device`? (torch's fused kernel does)"""
        return _fused(device, self.impl)

    def update(self, params: dict, grads: dict, opt_state: dict, lr: float, grad_scale=None,
               found_inf=None) -> None:
        """`grad_scale` (a device scalar): the kernel divides the gradients by it; `found_inf` (1.0 / 0.0): with
        1.0 the kernel leaves params and moments as they are and undoes its step count. Fused kernel only."""
        for names, wd in zip(_groups(params), (self.weight_decay, 0.0)):
            if not names:
                continue
            p0 = params[names[0]]
            adamw([params[k] for k in names], [grads[k] for k in names],
                  [opt_state["exp_avg"][k] for k in names], [opt_state["exp_avg_sq"][k] for k in names], [],
                  [opt_state["step"][k] for k in names], **_adam_kernel(p0.device, self.impl),
                  grad_scale=grad_scale, found_inf=found_inf,
                  amsgrad=False, beta1=self.beta1, beta2=self.beta2, lr=lr, weight_decay=wd, eps=self.eps,
                  maximize=False)


@attrs.frozen(kw_only=True)
class SGD:
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    impl: str = "auto"

    def init(self, params: dict) -> dict:
        if self.momentum == 0:
            return {}
        return {"momentum_buffer": {k: torch.zeros_like(p) for k, p in params.items()}}

    def _kernel(self, device) -> dict:
        # an explicit "fused" on CPU stays foreach, as before (numbers unchanged); "auto" is fused on CUDA
        return _impl(device, "foreach" if self.impl == "fused" and device.type == "cpu" else self.impl)

    def skips_found_inf(self, device: torch.device) -> bool:
        return self._kernel(device)["fused"]

    def update(self, params: dict, grads: dict, opt_state: dict, lr: float, grad_scale=None,
               found_inf=None) -> None:
        for names, wd in zip(_groups(params), (self.weight_decay, 0.0)):
            if not names:
                continue
            bufs = [opt_state["momentum_buffer"][k] for k in names] if self.momentum else [None] * len(names)
            # torch's sgd creates momentum buffers lazily on step 1 (buf = grad); ours exist from init as
            # zeros, and with dampening 0, `0 * m + g` is that same first value.
            sgd([params[k] for k in names], [grads[k] for k in names], bufs,
                **self._kernel(params[names[0]].device), grad_scale=grad_scale, found_inf=found_inf,
                weight_decay=wd, momentum=self.momentum, lr=lr, dampening=0.0, nesterov=self.nesterov,
                maximize=False)


def make_optimizer(cfg):
    impl = getattr(cfg, "optimizer_impl", "auto")
    if cfg.optimizer == "adamw":
        return AdamW(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay, impl=impl)
    return SGD(momentum=cfg.momentum, weight_decay=cfg.weight_decay, impl=impl)


def schedule(kind: str, lr: float, warmup_steps: int = 0, total_steps: int = 0,
             min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """lr at optimizer step `s` (0-based): linear warmup, then constant / cosine / linear / inverse-sqrt."""
    min_lr = lr * min_lr_ratio

    def at(s: int) -> float:
        if s < warmup_steps:
            return lr * (s + 1) / warmup_steps
        if kind == "constant":
            return lr
        if kind == "inverse_sqrt":   # the paper's schedule, scaled so that it peaks at `lr`
            return lr * math.sqrt(max(warmup_steps, 1) / (s + 1))
        span = max(total_steps - warmup_steps, 1)
        frac = min((s - warmup_steps) / span, 1.0)
        if kind == "linear":
            return lr - (lr - min_lr) * frac
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))   # cosine
    return at


class Clock:
    """Wall-clock seconds a run has trained, across resumes (the loop saves `elapsed()` in state.json and hands
    it back to `resume`), against a budget of `budget_s` seconds.

    Schedules read `agreed`, the elapsed time the loop sets at log steps (averaged over ranks): every rank
    then computes the same learning rate, and DDP replicas stay equal."""

    def __init__(self, budget_s: float):
        self.budget_s, self.offset, self.t0, self.agreed = budget_s, 0.0, time.perf_counter(), 0.0

    def resume(self, elapsed: float):
        self.offset, self.t0, self.agreed = float(elapsed), time.perf_counter(), float(elapsed)

    def elapsed(self) -> float:
        return self.offset + time.perf_counter() - self.t0

    def fraction(self) -> float:
        return min(self.agreed / self.budget_s, 1.0)


def timed_schedule(kind: str, lr: float, warmup_steps: int, total_steps: int, clock: Clock,
                   min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """`schedule` for a run bounded by a time budget: linear warmup over steps, then cosine / linear decay over
    the larger of the fraction of steps and the fraction of `clock`'s budget done, so the learning rate reaches
    its floor when the time runs out on any machine. The rate then depends on the machine's speed: such a run
    is not bitwise reproducible. constant and inverse_sqrt do not look at the clock."""
    by_step = schedule(kind, lr, warmup_steps, total_steps, min_lr_ratio)
    if kind not in ("cosine", "linear"):
        return by_step
    min_lr = lr * min_lr_ratio

    def at(s: int) -> float:
        frac = max(clock.fraction(), min(s / max(total_steps, 1), 1.0))
        decayed = min_lr + (lr - min_lr) * (1 - frac if kind == "linear" else 0.5 * (1 + math.cos(math.pi * frac)))
        return decayed * min(1.0, (s + 1) / warmup_steps) if warmup_steps else decayed
    return at
