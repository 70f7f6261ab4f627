"""Research utilities that a functional core makes short: per-example gradients and the gradient noise scale,
Hessian-vector products and the top Hessian eigenvalue, ensembles trained in one vmapped step, and EMA helpers.

Every function takes the same `TrainState` and batches that `train_step` takes, and computes the same loss
(`step.loss_fn`: a sum of token cross-entropies divided by the token count). These transforms run the model

  - with dropout off (the deterministic loss; `per_example_grads_fn(state, dropout=True)` keeps it on),
  - in the params' dtype, without autocast (`options.precision` is a property of training, not of probes),
  - without activation checkpointing (torch.func transforms cannot run through it, docs/ARCHITECTURE.md; it only
    trades memory for recompute, so the math is unchanged),
  - with SDPA's math kernel: the fused CPU attention kernel has no vmap rule (vmap falls back to a Python
    loop over the examples, ~100x slower) and no forward-mode derivative (which `jvp` needs); the math kernel
    computes the same attention up to rounding.
"""
import contextlib
import math

import attrs
import torch
from torch.func import grad, grad_and_value, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import tree
from .config import ConfigError
from .optim import AdamW
from .remat import suspended
from .state import TrainState
from .step import IGNORE, dropout_seed, loss_fn


# -- the loss, as a function of params ------------------------------------------------------------------------

@contextlib.contextmanager
def functional_mode(model, train: bool = False):
    """Run `model` the way torch.func transforms need it (see the module docstring); restores it after."""
    was_training = model.training
    model.train(train)
    try:
        with sdpa_kernel([SDPBackend.MATH]), suspended(model):   # torch.func cannot run through checkpointing
            yield
    finally:
        model.train(was_training)


def _microbatches(batch):
    return list(batch) if isinstance(batch, (list, tuple)) else [batch]


def batch_loss(state: TrainState, params: dict, batch):
    """train_step's loss at `params`: the summed token loss of a batch (or list of micro-batches) divided by its
    token count. Call inside `functional_mode(state.model)` to get the deterministic loss."""
    sums, ntoks = zip(*(loss_fn(state.model, params, state.buffers, mb, state.options.label_smoothing)
                        for mb in _microbatches(batch)))
    return sum(sums) / sum(ntoks).clamp(min=1)


def example_loss(state: TrainState, params: dict, example: dict):
    """The loss of one example (tensors without a batch dimension): its mean token loss."""
    return batch_loss(state, params, {k: v.unsqueeze(0) for k, v in example.items()})


# -- per-example gradients --------------------------------------------------------------------------------------

def per_example_grads_fn(state: TrainState, *, dropout: bool = False, chunk_size: int | None = None):
    """A function `per_example_grads(params, batch) -> {name: Tensor[B, *param.shape]}`: the gradient of each
    example's mean token loss (`example_loss`), through `vmap(grad(...))` over the batch dimension.

    Padding is harmless: an example's padded positions are masked or ignored by the loss, exactly as in the
    batch. `dropout=True` runs the model in training mode with independent masks per example (vmap's
    randomness="different", seeded from the state's seed and step, so a call is reproducible and leaves the
    caller's RNG alone); the masks are not the ones `train_step` draws. `chunk_size` bounds vmap's memory.
    """
    g = vmap(grad(lambda p, ex: example_loss(state, p, ex)), in_dims=(None, 0),
             randomness="different" if dropout else "error", chunk_size=chunk_size)

    def per_example_grads(params: dict, batch: dict) -> dict:
        params = {k: v.detach() for k, v in params.items()}
        device = next(iter(params.values())).device
        with functional_mode(state.model, train=dropout), \
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(dropout_seed(state.seed, state.step, 0, 0))
            return g(params, batch)
    return per_example_grads


def grad_noise_scale(state: TrainState, batch, params: dict | None = None) -> dict:
    """The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical Model
    of Large-Batch Training", appendix A.1) from the per-example gradients of a batch (or list of micro-batches).

    With B examples, per-example gradients g_i and their mean g: unbiased estimates are
    tr(Sigma) = B/(B-1) (mean_i |g_i|^2 - |g|^2) and |G|^2 = (B |g|^2 - mean_i |g_i|^2) / (B-1). Returns 0-d
    tensors (no host sync): grad_noise_scale, grad_var_trace, grad_sq_norm (both estimates; the ratio is noisy
    and |G|^2 may even come out negative on a small batch) and example_grad_norm (mean per-example norm).
    """
    params = state.params if params is None else params
    per_example = per_example_grads_fn(state)
    total, sq_norms = None, []
    for mb in _microbatches(batch):   # one micro-batch of per-example gradients in memory at a time
        g = per_example(params, mb)
        sq_norms.append(sum(t.flatten(1).double().pow(2).sum(1) for t in g.values()))
        s = {k: t.double().sum(0) for k, t in g.items()}
        total = s if total is None else {k: total[k] + s[k] for k in s}
    sq_norms = torch.cat(sq_norms)
    n = sq_norms.numel()
    if n < 2:
        raise ValueError("grad_noise_scale needs a batch of at least 2 examples")
    mean_sq = sq_norms.mean()                                            # mean_i |g_i|^2
    sq_of_mean = sum(t.pow(2).sum() for t in total.values()) / n ** 2    # |mean_i g_i|^2
    trace = (mean_sq - sq_of_mean) * n / (n - 1)
    signal = (n * sq_of_mean - mean_sq) / (n - 1)
    return {"grad_noise_scale": trace / signal, "grad_var_trace": trace, "grad_sq_norm": signal,
            "example_grad_norm": sq_norms.sqrt().mean()}


# -- curvature ----------------------------------------------------------------------------------------------------

def _vdot(a: dict, b: dict):
    return sum((a[k] * b[k]).sum() for k in a)


def hvp(state: TrainState, params: dict, batch, v: dict) -> dict:
    """H v, with H the Hessian of the training loss (`batch_loss`, dropout off) at `params`: forward-mode
    `jvp` over reverse-mode `grad` (one forward and backward pass, with tangents)."""
    params = {k: t.detach() for k, t in params.items()}
    with functional_mode(state.model):
        return jvp(grad(lambda p: batch_loss(state, p, batch)), (params,), (v,))[1]


def _power_iteration(matvec, v: dict, iters: int, tol: float):
    """The largest-magnitude eigenvalue of a symmetric operator, as the Rayleigh quotient v.Av of unit v."""
    lam = None
    for _ in range(iters):
        norm = _vdot(v, v).sqrt()
        v = {k: t / norm for k, t in v.items()}
        hv = matvec(v)
        new = _vdot(v, hv).item()
        converged = lam is not None and abs(new - lam) <= tol * abs(new)
        lam, v = new, hv
        if converged:
            break
    return lam


def top_hessian_eigenvalue(state: TrainState, batch, *, params: dict | None = None, iters: int = 100,
                           tol: float = 1e-4, seed: int = 0) -> float:
    """The largest eigenvalue of the training loss's Hessian at `params` (default: the state's), by power
    iteration on `hvp`: the "sharpness" of the loss on `batch`. Stops when the Rayleigh quotient changes by
    less than `tol` (relative) or after `iters` products.

    Power iteration finds the eigenvalue of largest *magnitude*; if that one is negative, a second run on
    H - lambda I (whose spectrum is shifted to >= 0) finds the largest one. The start vector comes from
    `seed` (the global RNG is not touched)."""
    params = state.params if params is None else params
    gen = torch.Generator().manual_seed(seed)
    v0 = {k: torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device) for k, t in params.items()}
    matvec = lambda v: hvp(state, params, batch, v)   # noqa: E731
    lam = _power_iteration(matvec, v0, iters, tol)
    if lam < 0:
        shifted = lambda v: {k: t - lam * v[k] for k, t in matvec(v).items()}   # noqa: E731
        lam = lam + _power_iteration(shifted, v0, iters, tol)
    return lam


# -- ensembles: K models in one vmapped step ------------------------------------------------------------------

@attrs.define(kw_only=True)
class Ensemble:
    """K members with the same architecture: params and AdamW moments stacked along a leading K dimension.

    Members may differ in init seed, learning-rate schedule and weight decay; they share the step count, the
    AdamW betas and eps, and the step options (clipping, label smoothing)."""
    params: dict                     # name -> Tensor[K, ...]
    opt_state: dict                  # {"exp_avg": {name: [K, ...]}, "exp_avg_sq": {...}}
    step: int
    seeds: list
    lr_fns: list
    weight_decays: list
    template: TrainState = attrs.field(eq=False, repr=False)   # model, buffers, tx, options (member 0's)

    @property
    def size(self) -> int:
        return len(self.seeds)

    def member(self, i: int) -> TrainState:
        """Member `i` as an ordinary TrainState: evaluate it, checkpoint it, or keep training it alone."""
        params = {k: v[i].clone() for k, v in self.params.items()}
        opt = {m: {k: v[i].clone() for k, v in self.opt_state[m].items()} for m in ("exp_avg", "exp_avg_sq")}
        opt["step"] = {k: torch.tensor(float(self.step), device=v.device) for k, v in params.items()}
        tx = attrs.evolve(self.template.tx, weight_decay=self.weight_decays[i])
        return self.template.replace(params=params, opt_state=opt, step=self.step, seed=self.seeds[i],
                                     lr_fn=self.lr_fns[i], tx=tx, ema=None)


def ensemble_init(states: list) -> Ensemble:
    """Stack K TrainStates (same model definition, AdamW, fp32, same step) into an Ensemble."""
    first = states[0]
    for s in states:
        if not isinstance(s.tx, AdamW):
            raise ConfigError(f"ensemble: optimizer {type(s.tx).__name__}: only AdamW is implemented")
        if (s.tx.beta1, s.tx.beta2, s.tx.eps) != (first.tx.beta1, first.tx.beta2, first.tx.eps):
            raise ConfigError("ensemble: members must share AdamW beta1, beta2 and eps")
        if s.options.precision != "fp32":
            raise ConfigError(f"ensemble: precision={s.options.precision!r}: the ensemble step runs in fp32")
        if {k: p.shape for k, p in s.params.items()} != {k: p.shape for k, p in first.params.items()} \
                or s.step != first.step:
            raise ConfigError("ensemble: members must have the same params (names, shapes) and the same step")
        if any(int(t) != s.step for t in s.opt_state["step"].values()):
            raise ConfigError("ensemble: a member's optimizer step count differs from its step")
    stack = lambda trees: {k: torch.stack([t[k] for t in trees]) for k in trees[0]}   # noqa: E731
    return Ensemble(params=stack([s.params for s in states]),
                    opt_state={m: stack([s.opt_state[m] for s in states]) for m in ("exp_avg", "exp_avg_sq")},
                    step=first.step, seeds=[s.seed for s in states], lr_fns=[s.lr_fn for s in states],
                    weight_decays=[s.tx.weight_decay for s in states], template=first)


def _member_step(ens: Ensemble, params, exp_avg, exp_avg_sq, step_size, decay, microbatches, scale):
    """One member's train_step (vmapped over the K members): gradients of sum(loss_sum) * scale, global-norm
    clipping, then AdamW in plain tensor ops: torch's functional AdamW kernels (foreach/fused) have no vmap
    rule. Each line mirrors torch.optim.adamw's foreach path, in the same order of operations."""
    tx, opts = ens.template.tx, ens.template.options
    grads, loss_sum = None, 0.0
    for mb in microbatches:
        def scaled_loss(p):
            ls = loss_fn(ens.template.model, p, ens.template.buffers, mb, opts.label_smoothing)[0]
            return ls * scale, ls
        g, (_, ls) = grad_and_value(scaled_loss, has_aux=True)(params)
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        loss_sum = loss_sum + ls
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    if opts.clip_grad > 0:
        coef = (opts.clip_grad / (grad_norm + 1e-6)).clamp(max=1.0)
        grads = {k: g * coef for k, g in grads.items()}
    bias2_sqrt = math.sqrt(1 - tx.beta2 ** (ens.step + 1))
    new_p, new_m, new_v = {}, {}, {}
    for k, p in params.items():
        g = grads[k]
        if p.dim() >= 2:                                     # decayed group: matrices and embeddings (optim._groups)
            p = p * decay
        m = torch.lerp(exp_avg[k], g, 1 - tx.beta1)
        v = torch.addcmul(exp_avg_sq[k] * tx.beta2, g, g, value=1 - tx.beta2)
        new_p[k] = p + (-step_size * m) / (v.sqrt() / bias2_sqrt + tx.eps)   # addcdiv(p, m, denom, -step_size)
        new_m[k], new_v[k] = m, v
    return new_p, new_m, new_v, loss_sum.detach(), grad_norm.detach()


def ensemble_step(ens: Ensemble, batch) -> tuple:
    """One optimizer step of all K members on the same batch (or list of micro-batches), as one vmapped
    computation. Returns (new Ensemble, metrics) with per-member tensors [K]; pure (the input is untouched).

    With dropout 0 each member's update equals `train_step` on that member (same formula, fp32; rounding
    differs slightly because batched matmuls sum in another order). With dropout on, members draw independent
    masks (vmap randomness="different", seeded from member 0's seed and the step), not the masks `train_step`
    would draw for each member."""
    microbatches = _microbatches(batch)
    ntok = sum((mb["targets"] != IGNORE).sum() for mb in microbatches)
    scale = 1.0 / ntok.clamp(min=1).float()
    lrs = [fn(ens.step) for fn in ens.lr_fns]
    beta1 = ens.template.tx.beta1
    # per-member scalars computed in Python doubles exactly as torch's AdamW does, then rounded to fp32 as its
    # kernels do
    p0 = next(iter(ens.params.values()))
    step_size = torch.tensor([lr / (1 - beta1 ** (ens.step + 1)) for lr in lrs], dtype=p0.dtype, device=p0.device)
    decay = torch.tensor([1 - lr * wd for lr, wd in zip(lrs, ens.weight_decays)], dtype=p0.dtype, device=p0.device)
    model = ens.template.model
    step = vmap(lambda *a: _member_step(ens, *a, microbatches, scale), randomness="different")
    with functional_mode(model, train=model.training), \
            torch.random.fork_rng(devices=[p0.device] if p0.device.type == "cuda" else []):
        torch.manual_seed(dropout_seed(ens.seeds[0], ens.step, 0, 0))
        params, m, v, loss_sum, grad_norm = step({k: t.detach() for k, t in ens.params.items()},
                                                 ens.opt_state["exp_avg"], ens.opt_state["exp_avg_sq"],
                                                 step_size, decay)
    metrics = {"loss_sum": loss_sum, "ntokens": ntok, "grad_norm": grad_norm,
               "lr": torch.tensor(lrs, dtype=torch.float64)}
    return attrs.evolve(ens, params=params, opt_state={"exp_avg": m, "exp_avg_sq": v}, step=ens.step + 1), metrics


# -- EMA of the params ------------------------------------------------------------------------------------------

def with_ema(state: TrainState, decay: float) -> TrainState:
    """`state` with an EMA of its params, started at the current params: from now on each `train_step` does
    ema <- decay * ema + (1 - decay) * params after the optimizer update, and checkpoints save it."""
    if not 0.0 < decay < 1.0:
        raise ConfigError(f"ema_decay={decay!r}: must be in (0, 1)")
    return state.replace(options=attrs.evolve(state.options, ema_decay=decay), ema=tree.clone(state.params))


def ema_state(state: TrainState) -> TrainState:
    """A state whose params are the EMA params: pass it to eval_step, a task's evaluate, or decoding."""
    if state.ema is None:
        raise ValueError("this state keeps no EMA (see with_ema / StepOptions.ema_decay)")
    return state.replace(params=state.ema)


# -- the fit loop's hooks (config fields ema_decay, log_grad_noise, sharpness_every) ----------------------------

def check_config(cfg, engine_name: str) -> None:
    """Fail before training on research options this run cannot honour."""
    wanted = [f for f in ("ema_decay", "log_grad_noise", "sharpness_every") if getattr(cfg, f)]
    if wanted and engine_name in ("deepspeed", "fsdp"):
        # the params are partitioned across ranks (ZeRO, FSDP): the probes run on whole, local params
        raise ConfigError(f"{wanted[0]}: not supported with engine={engine_name!r} (use eager or ddp)")
    if cfg.sharpness_every and cfg.sharpness_every % cfg.log_every:
        raise ConfigError(f"sharpness_every={cfg.sharpness_every}: must be a multiple of log_every={cfg.log_every} "
                          "(sharpness is reported on the train log line)")


def train_probes(cfg, state: TrainState, batch) -> dict:
    """Extra fields for the train log line at `state.step`, measured on the step's (micro-)batches."""
    out = {}
    if cfg.log_grad_noise:
        out.update(grad_noise_scale(state, batch))
    if cfg.sharpness_every and state.step % cfg.sharpness_every == 0:
        out["sharpness"] = top_hessian_eigenvalue(state, batch, iters=20, tol=1e-3, seed=state.step)
    return out
