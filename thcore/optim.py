"""Functional optimizers on torch.optim's own kernels, and learning-rate schedules.

An optimizer is a small frozen object: `init(params) -> opt_state` and `update(params, grads, opt_state, lr)`,
which updates `params` and `opt_state` in place with `torch.optim.adamw.adamw` / `torch.optim.sgd.sgd` (bitwise
equal to `torch.optim.AdamW` / `SGD`). Weight decay applies to matrices only (dim >= 2), as in nanoGPT.
"""
import math

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
    impl = cfg.optimizer_impl
    if cfg.optimizer == "adamw":
        return AdamW(beta1=cfg.beta1, beta2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay, impl=impl)
    return SGD(momentum=cfg.momentum, weight_decay=cfg.weight_decay, impl=impl)


@attrs.frozen(kw_only=True)
class Schedule:
    """The learning rate at optimizer step `s` (0-based): linear warmup, then constant / cosine / linear /
    inverse-sqrt. A pure function of the step and of `elapsed_s`, the training time the ranks agreed on, which the
    time budget passes in (`at`) so that every rank computes the same rate.

    With a time budget (`budget_s` > 0) cosine and linear decay over the larger of the fraction of steps and the
    fraction of the budget used, so the rate reaches its floor when the time runs out on any machine; such a run
    depends on the machine's speed and is not bitwise reproducible. constant and inverse_sqrt ignore the time."""
    kind: str
    lr: float
    warmup_steps: int = 0
    total_steps: int = 0
    min_lr_ratio: float = 0.1
    budget_s: float = 0.0
    elapsed_s: float = 0.0

    def at(self, elapsed_s: float) -> "Schedule":
        return attrs.evolve(self, elapsed_s=float(elapsed_s))

    def __call__(self, s: int) -> float:
        lr, warmup = self.lr, self.warmup_steps
        if self.budget_s and self.kind in ("cosine", "linear"):   # warmup over steps, decay over the larger fraction
            frac = max(min(self.elapsed_s / self.budget_s, 1.0), min(s / max(self.total_steps, 1), 1.0))
            return self._decayed(frac) * min(1.0, (s + 1) / warmup) if warmup else self._decayed(frac)
        if s < warmup:
            return lr * (s + 1) / warmup
        if self.kind == "constant":
            return lr
        if self.kind == "inverse_sqrt":   # the paper's schedule, scaled so that it peaks at `lr`
            return lr * math.sqrt(max(warmup, 1) / (s + 1))
        return self._decayed(min((s - warmup) / max(self.total_steps - warmup, 1), 1.0))

    def _decayed(self, frac: float) -> float:
        lr, min_lr = self.lr, self.lr * self.min_lr_ratio
        if self.kind == "linear":
            return lr - (lr - min_lr) * frac
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))   # cosine


def schedule(kind: str, lr: float, warmup_steps: int = 0, total_steps: int = 0, min_lr_ratio: float = 0.1,
             budget_s: float = 0.0) -> Schedule:
    return Schedule(kind=kind, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                    min_lr_ratio=min_lr_ratio, budget_s=budget_s)


def run_schedule(cfg, total_steps: int) -> Schedule:
    """The schedule a run config asks for (`max_minutes` > 0: decay over the time budget too)."""
    return schedule(cfg.lr_schedule, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio, cfg.max_minutes * 60)
