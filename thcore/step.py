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
from .config import ConfigError
from .losses import linear_cross_entropy
from .state import TrainState

IGNORE = -100
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def loss_fn(model, params, buffers, batch, label_smoothing: float = 0.0, ce_chunk: int = 0):
    """(sum of token cross-entropies, number of target tokens) of one batch; bf16/fp16 logits are cast to fp32
    for the loss (fp64 stays fp64: research checks against exact math run the model in double).

    ce_chunk > 0: the output layer and the loss run fused, ce_chunk tokens at a time (thcore/losses.py), on a
    model that names its output layer (`output_params`) and has `features` (forward without it), as GPT."""
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    if ce_chunk:
        if not hasattr(model, "output_params"):
            raise ConfigError(f"ce_chunk={ce_chunk}: {type(model).__name__} has no output_params/features() "
                              f"(GPT has); use ce_chunk=0")
        h = func.apply(model, params, buffers, method="features", **inputs)
        w, b = model.output_params
        targets = batch["targets"]
        weight = params[w]
        # a padded output layer (GPT's vocab_multiple) runs whole; its rows past vocab_size are no class
        loss_sum = linear_cross_entropy(h.flatten(0, -2), weight, params[b] if b else None, targets.flatten(),
                                        ce_chunk, label_smoothing, IGNORE, getattr(model, "vocab_size", None))
        return loss_sum, (targets != IGNORE).sum()
    logits = func.apply(model, params, buffers, **inputs)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = batch["targets"]
    loss_sum = F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum", label_smoothing=label_smoothing)
    return loss_sum, (targets != IGNORE).sum()


class LossModule(torch.nn.Module):
    """The model with loss_fn as its forward -> (sum of token losses, tokens): what the DDP and DeepSpeed engines
    wrap (the module holds the params itself, which those engines own; nothing for functional_call to swap).
    ce_chunk > 0: the output layer and the loss run fused (loss_fn), inside the one module DDP wraps."""

    def __init__(self, model: torch.nn.Module, label_smoothing: float, ce_chunk: int = 0):
        super().__init__()
        self.model, self.label_smoothing, self.ce_chunk = model, label_smoothing, ce_chunk

    def forward(self, batch):
        # the fused loss takes the output weight by name: the module's own Parameter, looked up now (an engine
        # may have rebound it), so its gradient reaches .grad and DDP's hooks as any other's
        own = {}
        if self.ce_chunk:
            own = {n: self.model.get_parameter(n) for n in getattr(self.model, "output_params", ()) if n}
        return loss_fn(self.model, own, {}, batch, self.label_smoothing, self.ce_chunk)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


_SDPA = {"flash": ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
         "efficient": ("EFFICIENT_ATTENTION", "FLASH_ATTENTION", "MATH"),
         "cudnn": ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"),
         "math": ("MATH",)}


def sdpa_backend(name: str):
    """Attention kernels in priority order; SDPA takes the first that accepts the inputs, so a GPU kernel named
    on a CPU falls through to the CPU's flash kernel (same code path on both). "auto" = torch's own order."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([getattr(SDPBackend, b) for b in _SDPA[name]], set_priority=True)


def dropout_seed(seed: int, step: int, micro: int, stream: int) -> int:
    """A per-(step, micro-batch, rank) seed: a resumed run replays the same dropout masks."""
    return hash((seed, step, micro, stream)) & 0x7FFF_FFFF_FFFF_FFFF   # int tuples hash identically in every process


def _micro_grads(model, params, buffers, batch, scale, precision, label_smoothing, ce_chunk=0):
    """Gradients of `loss_sum * scale` for one micro-batch, through functional_call + autograd.grad."""
    device = next(iter(params.values())).device
    with autocast(precision, device):
        loss_sum, ntok = loss_fn(model, params, buffers, batch, label_smoothing, ce_chunk)
    grads = torch.autograd.grad(loss_sum * scale, list(params.values()))
    return grads, loss_sum.detach()


_compiled = {}


def _grads_fn(options):
    if not options.compile and not options.cuda_graphs:
        return _micro_grads
    # CUDA graphs: inductor captures the compiled forward+backward and replays it (one launch per graph);
    # on CPU the mode compiles exactly as the default one
    mode = "reduce-overhead" if options.cuda_graphs else "default"
    if mode not in _compiled:
        torch._dynamo.config.trace_autograd_ops = True   # lets dynamo trace autograd.grad in one graph
        _compiled[mode] = torch.compile(_micro_grads, mode=mode)
    return _compiled[mode]


def local_grads(state: TrainState, microbatches, scale, seeds):
    """Sum over micro-batches of d(loss_sum * scale)/d(params): the eager engine's gradient computation."""
    opts = state.options
    # under CUDA graphs the leaves are Parameters over the state's own storage: dynamo takes a Parameter for a
    # static input, so a replay reads the params where they are instead of copying them into the graph's inputs
    leaf = torch.nn.Parameter if opts.cuda_graphs else (lambda t: t.requires_grad_(True))
    params = {k: leaf(p.detach()) for k, p in state.params.items()}
    fn = _grads_fn(opts)
    grads, loss_sum = None, 0.0
    for mb, s in zip(microbatches, seeds):
        torch.manual_seed(s)
        if opts.cuda_graphs:   # the previous replay's outputs were consumed: their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with sdpa_backend(opts.sdpa_backend):
            g, ls = fn(state.model, params, state.buffers, mb, scale, opts.precision, opts.label_smoothing,
                       opts.ce_chunk)
        if opts.cuda_graphs:   # a replay's outputs live in graph memory that the next replay overwrites
            g, ls = (g if len(microbatches) == 1 else [t.clone() for t in g]), ls.clone()
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
               stream: int = 0, update_fn=None):
    """One optimizer step. Returns (new state, metrics) with metrics as tensors (no host sync).

    Pure by default: the input state is left untouched. `donate=True` updates its tensors in place (engines
    use it; it gives the same numbers without the copy). Engines change only `grads_fn` (how gradients are
    computed and reduced), `sum_fn` (sum of a scalar over ranks) and `stream` (their rank, for dropout).
    An engine that owns the optimizer (DeepSpeed: partitioned gradients, its clipping, loss scaling and
    update) also passes `update_fn(state, lr) -> (grad_norm, applied, lr)`; its grads_fn returns no gradients.
    """
    before = state   # pure: the caller's tensors stay as they are, and a non-finite step selects them back
    if not donate:
        state = state.clone()
    microbatches = batch if isinstance(batch, (list, tuple)) else [batch]
    opts = state.options
    device = next(iter(state.params.values())).device
    host = _host_check_is_free(device)
    fp16 = opts.precision == "fp16"
    if fp16 and not host:   # the dynamic loss scale lives on the device: deciding it never waits for the GPU
        state = state.replace(loss_scale=_on(state.loss_scale, device, torch.float32),
                              good_steps=_on(state.good_steps, device, torch.int64))
    ntok = sum((mb["targets"] != IGNORE).sum() for mb in microbatches)
    ntok_global = sum_fn(ntok) if sum_fn is not None else ntok
    scale = state.loss_scale / ntok_global.clamp(min=1).float()
    seeds = [dropout_seed(state.seed, state.step, i, stream) for i in range(len(microbatches))]
    with _rng_scope(device):
        grads, loss_sum = grads_fn(state, microbatches, scale, seeds)
    if update_fn is not None:
        return _engine_path(state, update_fn, loss_sum, ntok)

    grads = list(grads.values())
    # One decision per step, from quantities every rank shares: under DDP the gradients are global, so every rank
    # decides alike from them; the local loss only joins in a single process.
    loss_ok = torch.isfinite(loss_sum) if sum_fn is None else None
    if host:
        return _host_path(state, grads, loss_sum, ntok, loss_ok)
    return _device_path(state, before, donate, grads, loss_sum, ntok, loss_ok)


def _on(x, device, dtype):
    """A state scalar as a device tensor (a Python number only after init or a restore: one copy, then none)."""
    return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=dtype, device=device)


def _apply_update(state, grads, lr, grad_scale=None, found_inf=None):
    state.tx.update(state.params, dict(zip(state.params, grads)), state.opt_state, lr,
                    **({"grad_scale": grad_scale, "found_inf": found_inf} if found_inf is not None else {}))


def _verdict(fp16: bool, grads_ok, loss_ok):
    """(nonfinite, skipped) of a step: a non-finite step keeps params and optimizer state and is nan_policy's
    business; under fp16, overflowing gradients with a finite loss are the loss scale's (skipped, scale halved).
    `loss_ok` is None where the gradients are global and the loss is not (several ranks): they alone decide."""
    finite = grads_ok if loss_ok is None else grads_ok & loss_ok
    if not fp16:
        return ~finite, None
    nan_step = ~loss_ok if loss_ok is not None else torch.zeros_like(grads_ok)
    return nan_step, ~grads_ok & ~nan_step


def _engine_path(state, update_fn, loss_sum, ntok):
    """The engine applies the update (DeepSpeed skips a step whose gradients are not finite and says so); the
    verdict, the learning rate and the metrics are the same as for every other engine."""
    grad_norm, applied, lr = update_fn(state, state.lr_fn(state.step))
    applied = torch.as_tensor(applied, device=loss_sum.device)   # DeepSpeed has read its norm: no wait here
    nonfinite, skipped = _verdict(state.options.precision == "fp16", applied, None)
    metrics = {"loss_sum": loss_sum, "ntokens": ntok, "grad_norm": grad_norm, "lr": lr, "nonfinite": nonfinite}
    if skipped is not None:
        metrics["skipped"] = skipped
    return state.replace(step=state.step + 1), metrics


def _host_path(state, grads, loss_sum, ntok, loss_ok):
    """A CPU: every op has already run when Python reads a flag, so the step reads them and a skipped step
    costs no copy."""
    opts = state.options
    if opts.precision == "fp16":
        torch._foreach_mul_(grads, 1.0 / state.loss_scale)
    grad_norm = tree.global_norm(grads)
    metrics = {"loss_sum": loss_sum, "ntokens": ntok, "grad_norm": grad_norm, "lr": state.lr_fn(state.step)}
    # A non-finite step (NaN/Inf in the loss or the gradients) leaves params, optimizer state and EMA as they were
    # and reports metrics["nonfinite"]; the step counter and the data cursor move on (the loop applies nan_policy).
    nan_step, overflow = _verdict(opts.precision == "fp16", torch.isfinite(grad_norm), loss_ok)
    metrics["nonfinite"] = nan_step
    if nan_step.item():
        return state.replace(step=state.step + 1), metrics
    if overflow is not None:   # fp16's dynamic loss scale: skip the update and halve the scale on overflow
        if overflow.item():
            metrics["skipped"] = 1
            return state.replace(step=state.step + 1, loss_scale=state.loss_scale / 2, good_steps=0), metrics
        grow = state.good_steps + 1 >= opts.loss_scale_growth_interval
        state = state.replace(loss_scale=state.loss_scale * (2 if grow else 1),
                              good_steps=0 if grow else state.good_steps + 1)
    if opts.clip_grad > 0:
        torch._foreach_mul_(grads, (opts.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0))
    _apply_update(state, grads, metrics["lr"])
    if state.ema is not None:   # ema <- decay * ema + (1 - decay) * params, a pytree map done in place
        torch._foreach_lerp_([state.ema[k] for k in state.params], list(state.params.values()),
                             1.0 - opts.ema_decay)
    return state.replace(step=state.step + 1), metrics


def _device_path(state, before, donate, grads, loss_sum, ntok, loss_ok):
    """An accelerator runs ahead of the host: nothing here waits for it. Every decision is a device tensor.

    With torch's fused AdamW/SGD the kernel itself skips a non-finite step (`found_inf`: no update, the step
    count undone) and takes the fp16 unscale and the clipping as one divisor (`grad_scale`): no copy of the
    params or the optimizer state, no extra pass over the gradients. Other kernels get Flax's select between the
    old and the new trees (a copy of every protected tensor per step: the fused kernel is the default on CUDA)."""
    opts = state.options
    fp16 = opts.precision == "fp16"
    fused = getattr(state.tx, "skips_found_inf", lambda d: False)(grads[0].device)
    norm = tree.global_norm(grads)
    grad_norm = norm / state.loss_scale if fp16 else norm   # the scale is a power of two: exact
    grads_ok = torch.isfinite(grad_norm)
    finite = grads_ok if loss_ok is None else grads_ok & loss_ok
    metrics = {"loss_sum": loss_sum, "ntokens": ntok, "grad_norm": grad_norm, "lr": state.lr_fn(state.step)}
    nan_step, overflow = _verdict(fp16, grads_ok, loss_ok)
    metrics["nonfinite"] = nan_step
    if fp16:   # a non-finite loss is a NaN step (scale kept); overflowing gradients the loss scale's business
        metrics["skipped"] = overflow
        grow = finite & (state.good_steps + 1 >= opts.loss_scale_growth_interval)
        new_scale = torch.where(overflow, state.loss_scale * 0.5, torch.where(grow, state.loss_scale * 2,
                                                                              state.loss_scale))
        new_good = torch.where(nan_step, state.good_steps,
                               torch.where(overflow | grow, 0, state.good_steps + 1))
    # the divisor that unscales and clips: g / (loss_scale / clip) = (g / loss_scale) * clip
    clip = (opts.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0) if opts.clip_grad > 0 else None
    if fused:
        divisor = state.loss_scale if fp16 else None
        if clip is not None:
            divisor = 1.0 / clip if divisor is None else divisor / clip
        _apply_update(state, grads, metrics["lr"], grad_scale=None if divisor is None else divisor.float(),
                      found_inf=(~finite).float())
        if state.ema is not None:   # weight 0 on a skipped step: the EMA stays as it was
            w = (1.0 - opts.ema_decay) * finite.float()
            torch._foreach_lerp_([state.ema[k] for k in state.params], list(state.params.values()),
                                 [w] * len(state.params))
    else:
        keep = _protected(before) if not donate else [t.clone() for t in _protected(state)]
        if fp16:
            torch._foreach_mul_(grads, 1.0 / state.loss_scale)
        if clip is not None:
            torch._foreach_mul_(grads, clip)
        _apply_update(state, grads, metrics["lr"])
        if state.ema is not None:
            torch._foreach_lerp_([state.ema[k] for k in state.params], list(state.params.values()),
                                 1.0 - opts.ema_decay)
        for new, old in zip(_protected(state), keep):
            torch.where(finite, new, old, out=new)
    if fp16:
        state = state.replace(loss_scale=new_scale, good_steps=new_good)
    return state.replace(step=state.step + 1), metrics


def _host_check_is_free(device: torch.device) -> bool:
    """On a CPU every op has already run when Python gets its result: reading a flag costs nothing, and a skipped
    step then costs no copy. An accelerator runs ahead of the host, and waiting for it each step would stall it."""
    return device.type == "cpu"


def _protected(state: TrainState) -> list:
    """The tensors a non-finite step must leave as they were."""
    return [*state.params.values(), *tree.tree_leaves(state.opt_state),
            *(state.ema.values() if state.ema is not None else ())]


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
