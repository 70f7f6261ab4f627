"""train_step: purity, donation, accumulation, compile and precision, on the translation model."""
import pytest
import torch

from helpers import demo_batches
from thcore import tree
from thcore.models import Transformer
from thcore.remat import checkpoint_blocks
from thcore.optim import SGD, AdamW
from thcore.state import StepOptions, init_state
from thcore.step import train_step


@pytest.fixture(scope="module")
def data():
    return demo_batches(64, 16)


def make_state(data, dropout=0.1, **options):
    sv, tv, _ = data
    build = lambda: Transformer(len(sv), len(tv), d_model=32, num_heads=2, num_encoder_layers=1,  # noqa: E731
                                num_decoder_layers=1, d_ff=64, dropout=dropout)
    return init_state(build, AdamW(weight_decay=0.01), seed=0, lr=1e-3, options=StepOptions(**options))


def equal_trees(a, b):
    return all(torch.equal(x, y) for x, y in zip(tree.tree_leaves(a), tree.tree_leaves(b)))


def test_train_step_is_pure(data):
    state = make_state(data)
    before = tree.clone(state.params), tree.clone(state.opt_state)
    rng = torch.get_rng_state()
    s1, m1 = train_step(state, data[2][0])
    s2, m2 = train_step(state, data[2][0])
    assert equal_trees(state.params, before[0]) and equal_trees(state.opt_state, before[1])
    assert state.step == 0
    assert torch.equal(torch.get_rng_state(), rng), "the step must not consume the caller's RNG"
    assert equal_trees(s1.params, s2.params) and torch.equal(m1["loss_sum"], m2["loss_sum"])
    assert s1.step == 1 and not equal_trees(s1.params, state.params)


def test_donation_equals_pure(data):
    pure, donated = make_state(data), make_state(data)
    for b in data[2]:
        pure, mp = train_step(pure, b)
        donated, md = train_step(donated, b, donate=True)
        assert torch.equal(mp["loss_sum"], md["loss_sum"])
    assert equal_trees(pure.params, donated.params) and equal_trees(pure.opt_state, donated.opt_state)


def test_dropout_depends_on_step_and_seed_only(data):
    a, b = make_state(data), make_state(data)
    torch.manual_seed(123)   # the caller's RNG must not matter
    a, ma = train_step(a, data[2][0])
    torch.manual_seed(456)
    b, mb = train_step(b, data[2][0])
    assert torch.equal(ma["loss_sum"], mb["loss_sum"]) and equal_trees(a.params, b.params)


def test_accumulation_equals_big_batch(data):
    """Two micro-batches give the gradient of their union: the loss is normalised by the step's tokens."""
    big = {k: torch.nn.utils.rnn.pad_sequence(list(data[2][0][k]) + list(data[2][1][k]), batch_first=True,
                                              padding_value=-100 if k == "targets" else 0)
           for k in data[2][0]}
    # dropout masks differ between the two layouts: compare with dropout off; plain SGD makes the update
    # linear in the gradient (Adam's first step is ~sign(g) and amplifies rounding of tiny gradients)
    a = make_state(data, clip_grad=0.0).replace(tx=SGD(momentum=0.0), opt_state={})
    b = make_state(data, clip_grad=0.0).replace(tx=SGD(momentum=0.0), opt_state={})
    a.model.eval(), b.model.eval()
    a, ma = train_step(a, [data[2][0], data[2][1]])
    b, mb = train_step(b, big)
    assert torch.allclose(ma["loss_sum"], mb["loss_sum"], rtol=1e-5)
    assert torch.allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-5, atol=1e-6)


def test_compile_matches_eager(data):
    # dropout off: inductor draws dropout masks from its own generator, so masks differ by design
    eager, comp = make_state(data, dropout=0.0), make_state(data, dropout=0.0, compile=True)
    for b in data[2][:3]:
        eager, me = train_step(eager, b, donate=True)
        comp, mc = train_step(comp, b, donate=True)
        torch.testing.assert_close(mc["loss_sum"], me["loss_sum"], rtol=1e-4, atol=1e-4)
    for k in eager.params:
        # Adam turns rounding in near-zero gradients into up to ~lr/10 differences
        torch.testing.assert_close(comp.params[k], eager.params[k], rtol=1e-3, atol=5e-4)


def test_bf16_autocast_trains_close_to_fp32(data):
    f32, b16 = make_state(data), make_state(data, precision="bf16")
    f32, m32 = train_step(f32, data[2][0])
    b16, m16 = train_step(b16, data[2][0])
    assert all(p.dtype == torch.float32 for p in b16.params.values())   # master weights stay fp32
    torch.testing.assert_close(m16["loss_sum"], m32["loss_sum"], rtol=2e-2, atol=0)


def test_fp16_overflow_skips_update_and_halves_scale(data):
    state = make_state(data, precision="fp16")
    assert state.loss_scale == 2.0 ** 16
    state = state.replace(loss_scale=1e38)   # forces inf gradients in fp16
    new, m = train_step(state, data[2][0])
    assert m.get("skipped") == 1 and new.loss_scale == 5e37 and new.step == 1
    assert equal_trees(new.params, state.params) and equal_trees(new.opt_state, state.opt_state)
    new, m = train_step(new.replace(loss_scale=1024.0), data[2][0])
    assert "skipped" not in m and torch.isfinite(m["grad_norm"]) and new.good_steps == 1
    assert not equal_trees(new.params, state.params)


def test_activation_checkpointing_is_bitwise_equal(data):
    plain = make_state(data)
    ckpt = make_state(data)
    checkpoint_blocks(ckpt.model)
    plain, mp = train_step(plain, data[2][0])
    ckpt, mc = train_step(ckpt, data[2][0])
    assert torch.equal(mp["loss_sum"], mc["loss_sum"]) and equal_trees(plain.params, ckpt.params)
