"""train_step and eval_step: the only training math.

A batch is a dict of tensors: `targets` (token ids, -100 = ignore) plus the model's keyword inputs
(translation: `src`, `tgt_in`; GPT: `idx`). A step takes one batch or a list of micro-batches (gradient
accumulation). The loss is a *sum* over target tokens divided by the token count of the whole step, summed over
micro-batches and (through `sum_fn`) over ranks: the mean over a global batch of uneven sentences, exactly.
"""
import contextlib

import torch
import torch.nn.functional as F

from . import func, tree
from .state import TrainState

IGNORE = -100
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def loss_fn(model, params, buffers, batch, label_smoothing: float = 0.0):
    """(sum of token cross-entropies, number of target tokens) of one batch; bf16/fp16 logits are cast to fp32
    for the loss (fp64 stays fp64: research checks against exact math run the model in double)."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    logits = func.apply(model, params, buffers, **inputs)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = batch["targets"]
    loss_sum = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum", label_smoothing=label_smoothing)
    return loss_sum, (targets != IGNORE).sum()


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def dropout_seed(seed: int, step: int, micro: int, stream: int) -> int:
    """A per-(step, micro-batch, rank) seed: a resumed run replays the same dropout masks."""
    return hash((seed, step, micro, stream)) & 0x7FFF_FFFF_FFFF_FFFF   # int tuples hash identically in every process


def _micro_grads(model, params, buffers, batch, scale, precision, label_smoothing):
    """Gradients of `loss_sum * scale` for one micro-batch, through functional_call + autograd.grad."""
    device = next(iter(params.values())).device
    with autocast(precision, device):
        loss_sum, ntok = loss_fn(model, params, buffers, batch, label_smoothing)
    grads = torch.autograd.grad(loss_sum * scale, list(params.values()))
    return grads, loss_sum.detach()


_compiled = {}


def _grads_fn(options):
    if not options.compile:
        return _micro_grads
    if "fn" not in _compiled:
        torch._dynamo.config.trace_autograd_ops = True   # lets dynamo trace autograd.grad in one graph
        _compiled["fn"] = torch.compile(_micro_grads)
    return _compiled["fn"]


def local_grads(state: TrainState, microbatches, scale, seeds):
    """Sum over micro-batches of d(loss_sum * scale)/d(params): the eager engine's gradient computation."""
    params = {k: p.detach().requires_grad_(True) for k, p in state.params.items()}
    fn = _grads_fn(state.options)
    grads, loss_sum = None, 0.0
    for mb, s in zip(microbatches, seeds):
        torch.manual_seed(s)
        g, ls = fn(state.model, params, state.buffers, mb, scale, state.options.precision,
                   state.options.label_smoothing)
        if grads is None:
            grads = list(g)
        else:
            torch._foreach_add_(grads, g)
        loss_sum = loss_sum + ls
    return dict(zip(state.params, grads)), loss_sum


def _rng_scope(device):
    """Seeding dropout must not leak into the caller's global RNG: the step stays pure."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def train_step(state: TrainState, batch, *, donate: bool = False, grads_fn=local_grads, sum_fn=None,
               stream: int = 0):
    """One optimizer step. Returns (new state, metrics) with metrics as tensors (no host sync).

    Pure by default: the input state is left untouched. `donate=True` updates its tensors in place (engines
    use it; it gives the same numbers without the copy). Engines change only `grads_fn` (how gradients are
    computed and reduced), `sum_fn` (sum of a scalar over ranks) and `stream` (their rank, for dropout).
    """
    if not donate:
        state = state.clone()
    microbatches = batch if isinstance(batch, (list, tuple)) else [batch]
    opts = state.options
    device = next(iter(state.params.values())).device
    ntok = sum((mb["targets"] != IGNORE).sum() for mb in microbatches)
    ntok_global = sum_fn(ntok) if sum_fn is not None else ntok
    scale = state.loss_scale / ntok_global.clamp(min=1).float()
    seeds = [dropout_seed(state.seed, state.step, i, stream) for i in range(len(microbatches))]
    with _rng_scope(device):
        grads, loss_sum = grads_fn(state, microbatches, scale, seeds)

    grads = list(grads.values())
    if opts.precision == "fp16":
        torch._foreach_mul_(grads, 1.0 / state.loss_scale)
    grad_norm = tree.global_norm(grads)
    metrics = {"loss_sum": loss_sum, "ntokens": ntok, "grad_norm": grad_norm, "lr": state.lr_fn(state.step)}

    if opts.precision == "fp16":   # dynamic loss scale: skip the update and halve the scale on overflow
        if not torch.isfinite(grad_norm).item():
            metrics["skipped"] = 1
            return state.replace(step=state.step + 1, loss_scale=state.loss_scale / 2, good_steps=0), metrics
        grow = state.good_steps + 1 >= opts.loss_scale_growth_interval
        state = state.replace(loss_scale=state.loss_scale * (2 if grow else 1),
                              good_steps=0 if grow else state.good_steps + 1)
    if opts.clip_grad > 0:
        torch._foreach_mul_(grads, (opts.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0))
    state.tx.update(state.params, dict(zip(state.params, grads)), state.opt_state, metrics["lr"])
    if state.ema is not None:   # ema <- decay * ema + (1 - decay) * params, a pytree map done in place
        torch._foreach_lerp_([state.ema[k] for k in state.params], list(state.params.values()),
                             1.0 - opts.ema_decay)
    return state.replace(step=state.step + 1), metrics


@torch.no_grad()
def eval_step(state: TrainState, batch):
    """(loss sum, token count) of a batch under the state's params, dropout off."""
    device = next(iter(state.params.values())).device
    state.model.eval()
    try:
        with autocast(state.options.precision, device):
            return loss_fn(state.model, state.params, state.buffers, batch, 0.0)
    finally:
        state.model.train()
