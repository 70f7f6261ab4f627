"""Research API (thcore/research.py): per-example gradients, the gradient noise scale, curvature probes, vmapped
ensembles, EMA, their hooks in the fit loop, and the README's research example executed as written."""
import os
import re

import pytest
import torch

from helpers import ROOT, demo_batches
from thcore import checkpoint, research, tree
from thcore.config import ConfigError
from thcore.models import GPT, Transformer
from thcore.optim import SGD, AdamW
from thcore.remat import checkpoint_blocks, is_checkpointed
from thcore.state import StepOptions, init_state
from thcore.step import IGNORE, local_grads, train_step


@pytest.fixture(scope="module")
def data():
    return demo_batches(48, 8)


def translation(data, dropout=0.0, activation="relu"):
    sv, tv, batches = data
    build = lambda: Transformer(len(sv), len(tv), d_model=16, num_heads=2, num_encoder_layers=1,  # noqa: E731
                                num_decoder_layers=1, d_ff=32, dropout=dropout, activation=activation)
    return build, batches


def gpt(bias=True, n_embd=16, vocab=16):
    build = lambda: GPT(vocab_size=vocab, block_size=8, n_layer=1, n_head=2, n_embd=n_embd, dropout=0.0,  # noqa: E731
                        bias=bias)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(6):
        tokens = torch.randint(0, vocab, (6, 9), generator=g)
        targets = tokens[:, 1:].clone()
        targets[0, 5:] = IGNORE   # one shorter example: per-example token counts differ
        batches.append({"idx": tokens[:, :-1], "targets": targets})
    return build, batches


@pytest.fixture(params=["translation", "gpt"])
def model(request, data):
    return translation(data) if request.param == "translation" else gpt()


def double(state):
    """The state in float64: finite differences and explicit Hessians need more digits than fp32 has."""
    return state.replace(params=tree.tree_map(torch.Tensor.double, state.params),
                         buffers=tree.tree_map(torch.Tensor.double, state.buffers))


def unit_vector(params, seed):
    g = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    norm = sum(t.pow(2).sum() for t in v.values()).sqrt()
    return {k: t / norm for k, t in v.items()}


def tree_rel_err(a, b):
    return (sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt() / sum(b[k].pow(2).sum() for k in b).sqrt()).item()


# -- per-example gradients --------------------------------------------------------------------------------------

def test_per_example_grads_equal_a_loop_of_single_example_grads(model):
    build, batches = model
    state = init_state(build, seed=0)
    batch = batches[0]
    grads = research.per_example_grads_fn(state)(state.params, batch)
    B = batch["targets"].shape[0]
    for i in range(B):
        example = {k: v[i:i + 1] for k, v in batch.items()}   # a batch of one, padding and all
        ntok = (example["targets"] != IGNORE).sum()
        ref, _ = local_grads(state, [example], 1.0 / ntok.float(), [0])   # train_step's own gradient code
        for k in ref:
            assert grads[k].shape == (B, *state.params[k].shape)
            # fp32. rtol: the vmapped path sums in another order (batched matmuls, SDPA's math kernel). atol:
            # attention key biases have an exactly zero gradient (softmax ignores a per-query constant), so
            # both sides hold rounding noise (~1e-9) there
            torch.testing.assert_close(grads[k][i], ref[k], rtol=1e-4, atol=1e-6, msg=f"example {i}: {k}")
    # the loss is the same as train_step's: the token-weighted mean of per-example gradients is the batch gradient
    ntoks = (batch["targets"] != IGNORE).sum(1).float()
    full, _ = local_grads(state, [batch], 1.0 / ntoks.sum(), [0])
    for k, g in grads.items():
        mean = (g * ntoks.view(-1, *[1] * (g.dim() - 1))).sum(0) / ntoks.sum()
        torch.testing.assert_close(mean, full[k], rtol=1e-4, atol=1e-6, msg=k)


def test_per_example_grads_with_dropout(data):
    build, batches = translation(data, dropout=0.3)
    state = init_state(build, seed=0)
    checkpoint_blocks(state.model)   # torch.func cannot run through it: switched off inside
    twice = {k: v[:1].expand(2, *v.shape[1:]) for k, v in batches[0].items()}   # one example, twice
    rng = torch.get_rng_state()
    plain = research.per_example_grads_fn(state)(state.params, twice)
    a = research.per_example_grads_fn(state, dropout=True)(state.params, twice)
    b = research.per_example_grads_fn(state, dropout=True)(state.params, twice)
    assert torch.equal(torch.get_rng_state(), rng), "the caller's RNG must not be consumed"
    assert state.model.training and is_checkpointed(state.model), "the model's mode is restored"
    k = "decoder.0.ffn.linear1.weight"
    assert torch.equal(a[k], b[k]), "reproducible: seeded from the state"
    assert torch.allclose(plain[k][0], plain[k][1]), "dropout off: the same example gives the same gradient"
    assert not torch.allclose(a[k][0], a[k][1]), "dropout on: each example draws its own masks"


def test_grad_noise_scale_matches_its_definition(data):
    build, batches = translation(data)
    state = init_state(build, seed=0)
    mbs = batches[:2]   # a list of micro-batches: 16 examples with different padding
    got = research.grad_noise_scale(state, mbs)
    per_example = research.per_example_grads_fn(state)
    G = torch.cat([torch.cat([g.flatten(1) for g in per_example(state.params, mb).values()], 1) for mb in mbs])
    G = G.double()   # [16, num params]
    B = G.shape[0]
    trace = G.var(0, unbiased=True).sum()            # tr of the sample covariance: unbiased for tr(Sigma)
    sq_norm = G.mean(0).pow(2).sum() - trace / B     # E|mean g|^2 = |G|^2 + tr(Sigma) / B
    torch.testing.assert_close(got["grad_var_trace"], trace, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["grad_sq_norm"], sq_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["grad_noise_scale"], trace / sq_norm, rtol=1e-6, atol=0)
    torch.testing.assert_close(got["example_grad_norm"], G.norm(dim=1).mean(), rtol=1e-6, atol=0)
    # the same example 4 times: no gradient noise at all
    same = {k: v[:1].expand(4, *v.shape[1:]) for k, v in batches[0].items()}
    r = research.grad_noise_scale(state, same)
    assert r["grad_var_trace"].abs() <= 1e-6 * r["example_grad_norm"] ** 2
    with pytest.raises(ValueError, match="at least 2"):
        research.grad_noise_scale(state, {k: v[:1] for k, v in batches[0].items()})


# -- curvature --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["translation", "gpt"])
def test_hvp_equals_finite_differences_of_gradients(data, which):
    # gelu: ReLU's second derivative is a point mass, which finite differences across a kink do not see
    build, batches = translation(data, dropout=0.1, activation="gelu") if which == "translation" else gpt()
    state = double(init_state(build, seed=0))
    batch = batches[1]

    def grad(params):   # plain reverse mode through autograd, independent of the jvp-over-grad being tested
        params = {k: p.detach().requires_grad_(True) for k, p in params.items()}
        with research.functional_mode(state.model):
            loss = research.batch_loss(state, params, batch)
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    v, u = unit_vector(state.params, 1), unit_vector(state.params, 2)
    hv = research.hvp(state, state.params, batch, v)
    eps = 1e-5
    plus = grad({k: p + eps * v[k] for k, p in state.params.items()})
    minus = grad({k: p - eps * v[k] for k, p in state.params.items()})
    fd = {k: (plus[k] - minus[k]) / (2 * eps) for k in plus}
    # fp64 central differences: truncation ~eps^2, rounding ~1e-16/eps; measured ~1e-9 relative
    assert tree_rel_err(hv, fd) < 1e-6
    # and the Hessian is symmetric: u.Hv = v.Hu
    hu = research.hvp(state, state.params, batch, u)
    uhv, vhu = research._vdot(u, hv), research._vdot(v, hu)
    assert abs(uhv - vhu) <= 1e-9 * abs(uhv)


def test_top_hessian_eigenvalue_matches_the_explicit_hessian():
    build, batches = gpt(n_embd=4, vocab=8)   # 300 params: an explicit 300 x 300 Hessian
    # seed 3: an init whose most negative eigenvalue has the largest magnitude (seeds 3, 7, 8, 10, 11 of 0-11 are)
    state = double(init_state(build, seed=3))
    batch = {k: v[:4] for k, v in batches[0].items()}
    names = list(state.params)
    sizes = [state.params[k].numel() for k in names]

    def loss(flat):
        params = {k: t.view(state.params[k].shape) for k, t in zip(names, flat.split(sizes))}
        return research.batch_loss(state, params, batch)

    flat = torch.cat([state.params[k].flatten() for k in names])
    with research.functional_mode(state.model):   # reverse-over-reverse: independent of hvp's forward mode
        H = torch.autograd.functional.hessian(loss, flat)
    eig = torch.linalg.eigvalsh((H + H.T) / 2)
    top, bottom = eig[-1].item(), eig[0].item()
    # here the most negative eigenvalue has the largest magnitude: plain power iteration would converge to it,
    # so this also checks the shifted second run
    assert top > 0 and abs(bottom) > top
    lam = research.top_hessian_eigenvalue(state, batch, iters=300, tol=1e-10)
    # fp64; the tolerance is the power iteration's convergence, not rounding
    assert abs(lam - top) <= 1e-6 * top, (lam, top)


# -- ensembles --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["translation", "gpt"])
def test_ensemble_of_4_equals_4_separate_runs(data, which):
    build, batches = translation(data) if which == "translation" else gpt(bias=False)
    seeds, lrs, wds = (0, 1, 2, 3), (1e-2, 3e-3, 1e-2, 5e-3), (0.1, 0.0, 0.01, 0.1)
    separate = [init_state(build, AdamW(weight_decay=wd), seed=s, lr=lr) for s, lr, wd in zip(seeds, lrs, wds)]
    ens = research.ensemble_init(separate)
    steps = [batches[0], batches[1], [batches[2], batches[3]], batches[4]]   # incl. 2 accumulated micro-batches
    for batch in steps:
        before = tree.clone(ens.params)
        new, m = research.ensemble_step(ens, batch)
        assert all(torch.equal(before[k], ens.params[k]) for k in before), "ensemble_step is pure"
        ens = new
        for i, s in enumerate(separate):
            separate[i], ms = train_step(s, batch)
            # fp32: the same formula, rounding differs (batched matmuls, SDPA math kernel vs fused)
            torch.testing.assert_close(m["loss_sum"][i], ms["loss_sum"], rtol=1e-5, atol=0)
            torch.testing.assert_close(m["grad_norm"][i], ms["grad_norm"], rtol=1e-4, atol=0)
            assert m["lr"][i].item() == pytest.approx(ms["lr"])
    assert ens.step == len(steps)
    for i, s in enumerate(separate):
        member = ens.member(i)
        assert member.seed == s.seed and member.step == s.step and member.lr_fn(0) == s.lr_fn(0)
        for k in s.params:
            if k.endswith("k_proj.bias"):
                # attention key biases have an exactly zero gradient (softmax ignores a per-query constant): both
                # runs see rounding noise (~1e-10, different in batched and unbatched matmuls), which Adam divides
                # by its own magnitude into steps of up to ~lr either way. Only bounded, not compared.
                assert (member.params[k] - s.params[k]).abs().max() <= 2 * len(steps) * lrs[i]
                continue
            # after 4 Adam steps of up to lr=1e-2; a wrong bias correction or weight decay moves params by ~lr. An
            # element whose gradient is a near-cancelling sum (seen: 4.7e-5 from terms ~1e-2) differs by 4e-4
            # relative between batched and unbatched matmuls, which Adam's ~sign(g) first steps turn into 2e-5
            torch.testing.assert_close(member.params[k], s.params[k], rtol=1e-4, atol=3e-5, msg=f"member {i}: {k}")
            torch.testing.assert_close(member.opt_state["exp_avg"][k], s.opt_state["exp_avg"][k],
                                       rtol=1e-4, atol=1e-7, msg=f"member {i}: exp_avg {k}")
    # members really differ (different seeds and lrs), so a mix-up of members would fail above
    k = next(iter(separate[0].params))
    assert not torch.allclose(ens.params[k][0], ens.params[k][1], atol=1e-3)
    # a member is an ordinary TrainState: train_step continues it exactly as the separate run
    cont, _ = train_step(ens.member(0), batches[5])
    ref, _ = train_step(separate[0], batches[5])
    torch.testing.assert_close(cont.params[k], ref.params[k], rtol=1e-4, atol=3e-5)   # atol: as above


def test_ensemble_init_rejects_what_it_cannot_vmap(data):
    build, _ = translation(data)
    with pytest.raises(ConfigError, match="only AdamW"):
        research.ensemble_init([init_state(build, SGD(), seed=0)])
    with pytest.raises(ConfigError, match="beta1, beta2 and eps"):
        research.ensemble_init([init_state(build, AdamW(), seed=0), init_state(build, AdamW(beta2=0.9), seed=1)])
    with pytest.raises(ConfigError, match="fp32"):
        research.ensemble_init([init_state(build, seed=0, options=StepOptions(precision="bf16"))])


# -- EMA --------------------------------------------------------------------------------------------------------

def test_ema_equals_the_explicit_recurrence(model):
    build, batches = model
    decay = 0.8
    state = init_state(build, AdamW(), seed=0, lr=1e-2, options=StepOptions(ema_decay=decay))
    assert all(torch.equal(state.ema[k], state.params[k]) for k in state.params)   # e_0 = p_0
    expected = {k: p.double() for k, p in state.params.items()}
    for i, batch in enumerate(batches[:4]):
        before = tree.clone(state.ema)
        new, _ = train_step(state, batch, donate=i % 2 == 1)   # both the pure and the donating path
        if i % 2 == 0:
            assert all(torch.equal(state.ema[k], before[k]) for k in before), "a pure step leaves the EMA alone"
        expected = {k: decay * expected[k] + (1 - decay) * new.params[k].double() for k in expected}
        state = new
    for k in expected:
        # fp32 lerp against the fp64 recurrence: a few ulps per step
        torch.testing.assert_close(state.ema[k].double(), expected[k], rtol=1e-6, atol=1e-6, msg=k)
    assert not all(torch.allclose(state.ema[k], state.params[k]) for k in state.params)


def test_ema_is_checkpointed_and_restored(data, tmp_path):
    build, batches = translation(data)

    def fresh(ema: bool):
        state = init_state(build, seed=0)
        return research.with_ema(state, 0.9) if ema else state

    state = fresh(True)
    for b in batches[:2]:
        state, _ = train_step(state, b)
    path = checkpoint.save(state, str(tmp_path / "a"))
    assert "ema.safetensors" in os.listdir(path)
    checkpoint.verify(path)   # the manifest covers it
    assert all(torch.equal(state.to("cpu").ema[k], state.ema[k]) for k in state.ema)
    assert fresh(False).to("cpu").ema is None and fresh(False).clone().ema is None
    restored, _ = checkpoint.load(fresh(True), path)
    assert all(torch.equal(restored.ema[k], state.ema[k]) for k in state.ema)
    assert not any(restored.ema[k] is restored.params[k] for k in state.ema)
    # continuing after a restore keeps the EMA going exactly as without it
    a, _ = train_step(state, batches[2])
    b, _ = train_step(restored, batches[2])
    assert all(torch.equal(a.ema[k], b.ema[k]) for k in a.ema)
    # a state without EMA ignores the file; a checkpoint without EMA starts the EMA at its params
    assert checkpoint.load(fresh(False), path)[0].ema is None
    plain = checkpoint.save(state.replace(ema=None), str(tmp_path / "b"))
    assert "ema.safetensors" not in os.listdir(plain)
    started, _ = checkpoint.load(fresh(True), plain)
    assert all(torch.equal(started.ema[k], state.params[k]) for k in state.params)
    with pytest.raises(ConfigError, match="ema_decay"):
        research.with_ema(state, 1.0)


# -- the fit loop's hooks ---------------------------------------------------------------------------------------

def test_fit_logs_probes_and_evaluates_the_ema(tiny, tmp_path):
    from thcore.engines.eager import EagerEngine
    from thcore.loop import fit
    from thcore.metrics import read_jsonl
    from thcore.tasks.translation import TranslationTask

    def run(**kw):   # constant lr after warm-up: runs of different lengths share their first steps
        cfg = tiny(log_every=5, eval_every=10, ema_decay=0.9, d_model=16, d_ff=32, demo_train_size=320,
                   demo_valid_size=16, demo_test_size=8, max_len=24, lr_schedule="constant", **kw)
        return cfg, fit(cfg, TranslationTask(cfg), EagerEngine(cfg))

    cfg, state = run(max_steps=10, log_grad_noise=True, sharpness_every=10)
    rows = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    train_rows = {r["step"]: r for r in rows if r["split"] == "train"}
    assert sorted(train_rows) == [5, 10]
    for r in train_rows.values():
        assert {"loss", "grad_noise_scale", "grad_var_trace", "grad_sq_norm", "example_grad_norm"} <= set(r)
        assert r["grad_var_trace"] > 0 and r["example_grad_norm"] > 0
    assert "sharpness" not in train_rows[5] and train_rows[10]["sharpness"] > 0
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [10]
    assert {"loss", "exact_match", "ema_loss", "ema_exact_match"} <= set(val[0])
    assert val[0]["ema_loss"] != val[0]["loss"]
    ckpt = os.path.join(cfg.run_dir, "checkpoints", "step_10")
    assert "ema.safetensors" in os.listdir(ckpt)
    # resuming continues the EMA from the checkpoint: bitwise the run that never stopped (which also shows that
    # the probes leave training alone)
    _, resumed = run(max_steps=12)
    _, ref = run(max_steps=12, out_dir=str(tmp_path / "ref"))
    assert resumed.step == ref.step == 12
    for k in ref.params:
        assert torch.equal(resumed.params[k], ref.params[k]) and torch.equal(resumed.ema[k], ref.ema[k]), k
    assert not all(torch.equal(resumed.ema[k], state.ema[k]) for k in state.ema)


def test_research_options_are_checked_before_training(tiny):
    with pytest.raises(ConfigError, match="multiple of log_every"):
        research.check_config(tiny(sharpness_every=7, log_every=5), "eager")
    with pytest.raises(ConfigError, match="deepspeed"):
        research.check_config(tiny(ema_decay=0.99), "deepspeed")
    research.check_config(tiny(sharpness_every=10, log_every=5, log_grad_noise=True), "ddp")
    with pytest.raises(ConfigError, match="ema_decay"):
        tiny(ema_decay=1.0)


# -- the README example ------------------------------------------------------------------------------------------

def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    """The README's research example runs standalone; the snippets after it then run on its namespace."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Research API"):readme.index("## Performance")]
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme_example"}
    exec(compile(blocks[0], "README.md (research example)", "exec"), ns)
    ckpt = tmp_path / "runs" / "my-experiment" / "checkpoints" / f"step_{ns['state'].step}"
    assert sorted(os.listdir(ckpt)) == ["ema.safetensors", "manifest.json", "model.safetensors",
                                        "optimizer.safetensors", "state.json"]
    for i, block in enumerate(blocks[1:], 1):
        exec(compile(block, f"README.md (research snippet {i})", "exec"), ns)
    assert ns["ensemble"].size == 4 and ns["sharpness"] > 0
