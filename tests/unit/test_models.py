"""Each model part against a direct computation (CPU, fp32, small dims)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from thcore.models import (GPT, GPT_PRESETS, EncoderLayer, FeedForward, MultiHeadAttention,
                           SinusoidalPositionalEncoding, Transformer, attention, merge_heads, split_heads)
from thcore.remat import checkpoint_blocks

TOL = dict(rtol=1e-5, atol=1e-5)
SMALL = dict(d_model=32, num_heads=4, num_encoder_layers=2, num_decoder_layers=2, d_ff=64, max_len=64)


def ref_attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(d) + mask) v, written out. allowed: bool broadcastable to [B, H, T, S]."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def causal_mask(T, S):
    return torch.ones(T, S, dtype=torch.bool).tril()


def pad_mask(B, S, lengths):
    return torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


# -- layers ------------------------------------------------------------------------------------------------
def test_split_merge_heads_roundtrip():
    x = torch.randn(2, 5, 12)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    torch.testing.assert_close(h[:, 1], x[..., 4:8])  # head 1 holds features 4..7
    torch.testing.assert_close(merge_heads(h), x)


@pytest.mark.parametrize("case", ["none", "padding", "causal", "both"])
def test_attention_matches_explicit_softmax(case):
    torch.manual_seed(0)
    B, H, T, Dh = 3, 2, 5, 8
    q, k, v = (torch.randn(B, H, T, Dh) for _ in range(3))
    kpm = pad_mask(B, T, [5, 3, 1]) if case in ("padding", "both") else None
    causal = case in ("causal", "both")
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    if kpm is not None:
        allowed = allowed & ~kpm[:, None, None, :]
    if causal:
        allowed = allowed & causal_mask(T, T)
    got = attention(q, k, v, key_padding_mask=kpm, causal=causal)
    torch.testing.assert_close(got, ref_attention(q, k, v, allowed), **TOL)
    if case == "padding":
        # values at padded keys must not matter
        v2 = v.clone()
        v2[1, :, 3:] = 100.0
        torch.testing.assert_close(attention(q, k, v2, key_padding_mask=kpm), got, **TOL)


def test_attention_cross_lengths_with_padding():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 4, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    kpm = pad_mask(2, 7, [7, 2])
    got = attention(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(got, ref_attention(q, k, v, ~kpm[:, None, None, :]), **TOL)


def test_multihead_attention_matches_manual():
    torch.manual_seed(0)
    D, H = 16, 4
    mha = MultiHeadAttention(D, H).eval()
    x, mem = torch.randn(2, 5, D), torch.randn(2, 7, D)
    kpm = pad_mask(2, 7, [7, 4])

    def manual(x, kv, allowed):
        def heads(t):
            return t.view(t.size(0), t.size(1), H, D // H).transpose(1, 2)
        q = heads(x @ mha.q_proj.weight.T + mha.q_proj.bias)
        k = heads(kv @ mha.k_proj.weight.T + mha.k_proj.bias)
        v = heads(kv @ mha.v_proj.weight.T + mha.v_proj.bias)
        y = ref_attention(q, k, v, allowed).transpose(1, 2).reshape(x.size(0), x.size(1), D)
        return y @ mha.out_proj.weight.T + mha.out_proj.bias

    torch.testing.assert_close(mha(x), manual(x, x, None), **TOL)
    torch.testing.assert_close(mha(x, causal=True), manual(x, x, causal_mask(5, 5)), **TOL)
    torch.testing.assert_close(mha(x, mem, key_padding_mask=kpm), manual(x, mem, ~kpm[:, None, None, :]), **TOL)


def test_multihead_attention_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.5)
    x = torch.randn(2, 6, 16)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


def test_heads_must_divide_d_model():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by num_heads \(4\)"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match=r"d_model \(30\) must be divisible by num_heads \(4\)"):
        GPT(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=30)


def test_positional_encoding_matches_paper_formula():
    D, L = 6, 20
    pe = SinusoidalPositionalEncoding(D, L)
    for pos in (0, 1, 7, 19):
        for i in range(D // 2):
            angle = pos / 10000 ** (2 * i / D)
            assert pe.pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe.pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    x = torch.randn(2, 4, D)
    torch.testing.assert_close(pe(x), x + pe.pe[:4])
    torch.testing.assert_close(pe(x, offset=3), x + pe.pe[3:7])
    with pytest.raises(ValueError, match="max_len=20"):
        pe(torch.zeros(1, 21, D))
    # a buffer, never a parameter, never saved
    assert list(pe.named_parameters()) == []
    assert "pe" not in pe.state_dict()
    model = Transformer(11, 13, **SMALL)
    assert not any("pe" in n.split(".") for n, _ in model.named_parameters())
    assert "pos.pe" not in model.state_dict()


def test_positional_encoding_odd_width():
    pe = SinusoidalPositionalEncoding(5, 10)
    assert pe.pe[3, 4].item() == pytest.approx(math.sin(3 / 10000 ** (4 / 5)), abs=1e-6)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_feedforward_matches_manual(activation):
    torch.manual_seed(0)
    ff = FeedForward(8, 16, dropout=0.3, activation=activation).eval()
    x = torch.randn(2, 3, 8)
    act = torch.relu if activation == "relu" else F.gelu
    want = act(x @ ff.linear1.weight.T + ff.linear1.bias) @ ff.linear2.weight.T + ff.linear2.bias
    torch.testing.assert_close(ff(x), want, **TOL)
    with pytest.raises(ValueError, match="activation"):
        FeedForward(8, 16, activation="swish")


@pytest.mark.parametrize("pre_ln", [False, True])
def test_encoder_layer_matches_manual_composition(pre_ln):
    torch.manual_seed(0)
    layer = EncoderLayer(16, 4, 32, dropout=0.1, pre_ln=pre_ln).eval()
    for ln in (layer.norm1, layer.norm2):  # non-trivial LayerNorm affine, so a swapped norm would show
        torch.nn.init.normal_(ln.weight)
        torch.nn.init.normal_(ln.bias)
    x = torch.randn(2, 5, 16)
    kpm = pad_mask(2, 5, [5, 2])

    def ln(m, t):
        return F.layer_norm(t, (16,), m.weight, m.bias, m.eps)

    def sa(t):
        return layer.self_attn(t, key_padding_mask=kpm)

    if pre_ln:
        h = x + sa(ln(layer.norm1, x))
        want = h + layer.ffn(ln(layer.norm2, h))
    else:
        h = ln(layer.norm1, x + sa(x))
        want = ln(layer.norm2, h + layer.ffn(h))
    torch.testing.assert_close(layer(x, kpm), want, **TOL)


# -- Transformer -------------------------------------------------------------------------------------------
def make_transformer(**kw):
    torch.manual_seed(0)
    return Transformer(11, 13, **{**SMALL, **kw})


def test_transformer_shape_and_defaults():
    model = make_transformer().eval()
    src, tgt = torch.randint(1, 11, (3, 7)), torch.randint(1, 13, (3, 5))
    assert model(src, tgt).shape == (3, 5, 13)
    base = Transformer(100, 100)  # the paper's base model
    assert len(base.encoder) == len(base.decoder) == 6
    assert base.encoder[0].self_attn.num_heads == 8 and base.encoder[0].ffn.linear1.out_features == 2048
    assert base.generator.bias is not None


@pytest.mark.parametrize("pre_ln", [False, True])
def test_transformer_decoder_is_causal(pre_ln):
    model = make_transformer(pre_ln=pre_ln).eval()
    src, tgt = torch.randint(1, 11, (2, 6)), torch.randint(1, 13, (2, 8))
    logits = model(src, tgt)
    t = 4
    tgt2 = tgt.clone()
    tgt2[:, t] = (tgt[:, t] % 12) + 1  # a different token
    logits2 = model(src, tgt2)
    torch.testing.assert_close(logits2[:, :t], logits[:, :t], **TOL)
    assert (logits2[:, t] - logits[:, t]).abs().max() > 1e-3


def test_transformer_padding_invariance():
    model = make_transformer(pad_id=0).eval()
    src = torch.randint(1, 11, (2, 6))
    src[1, 4:] = 0  # second sentence already padded
    tgt = torch.randint(1, 13, (2, 5))
    padded = torch.cat([src, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(padded, tgt), model(src, tgt), **TOL)
    # and the pad columns do matter if they were real tokens (the test can fail)
    real = torch.cat([src, torch.full((2, 3), 5)], dim=1)
    assert (model(real, tgt) - model(src, tgt)).abs().max() > 1e-3


def test_transformer_forward_equals_decode_of_encode():
    model = make_transformer(pre_ln=True).eval()
    src, tgt = torch.randint(0, 11, (2, 6)), torch.randint(1, 13, (2, 4))
    memory, mask = model.encode(src)
    assert memory.shape == (2, 6, 32) and mask.dtype == torch.bool
    torch.testing.assert_close(mask, src == 0)
    torch.testing.assert_close(model.decode(tgt, memory, mask), model(src, tgt))


def test_transformer_tie_embeddings():
    model = make_transformer(tie_embeddings=True)
    assert model.generator.weight is model.tgt_embed.weight
    assert model.generator.bias is None
    names = [n for n, _ in model.named_parameters()]
    assert "tgt_embed.weight" in names and "generator.weight" not in names
    untied = make_transformer()
    assert untied.num_params(non_embedding=False) - model.num_params(non_embedding=False) == 13 * 32 + 13
    # a gradient step through the output layer moves the embedding: one tensor
    model(torch.randint(1, 11, (2, 4)), torch.randint(1, 13, (2, 3))).sum().backward()
    assert model.tgt_embed.weight.grad is not None


def test_transformer_init_xavier_and_pre_ln_final_norms():
    model = make_transformer(pre_ln=True)
    w = model.encoder[0].ffn.linear1.weight  # [64, 32]
    bound = math.sqrt(6 / (64 + 32))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert isinstance(model.enc_norm, torch.nn.LayerNorm) and isinstance(model.dec_norm, torch.nn.LayerNorm)
    assert isinstance(make_transformer().enc_norm, torch.nn.Identity)


def count_calls(modules):
    calls = []
    for m in modules:
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    return calls


def _loss_and_grads(model, src, tgt):
    torch.manual_seed(123)
    logits = model(src, tgt)
    loss = logits.square().mean()
    names, params = zip(*model.named_parameters())
    return logits, dict(zip(names, torch.autograd.grad(loss, params)))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_transformer_activation_checkpointing_equal(dropout):
    model = make_transformer(dropout=dropout).train()
    src, tgt = torch.randint(0, 11, (3, 6)), torch.randint(1, 13, (3, 5))
    calls = count_calls([*model.encoder, *model.decoder])
    logits, grads = _loss_and_grads(model, src, tgt)
    assert len(calls) == 4
    checkpoint_blocks(model)
    logits_ckpt, grads_ckpt = _loss_and_grads(model, src, tgt)
    assert len(calls) == 4 + 8  # every block recomputed once in backward
    with torch.no_grad():
        model(src, tgt)
    assert len(calls) == 12 + 4  # no checkpointing without grad
    torch.testing.assert_close(logits_ckpt, logits, rtol=0, atol=0)
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], rtol=1e-6, atol=1e-7)
    if dropout:  # dropout is really on: another seed gives other logits
        torch.manual_seed(7)
        assert not torch.allclose(model(src, tgt), logits)


def test_transformer_functional_call():
    model = make_transformer(tie_embeddings=True).eval()
    src, tgt = torch.randint(0, 11, (2, 6)), torch.randint(1, 13, (2, 4))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(functional_call(model, params, (src, tgt)), model(src, tgt))
    # the params dict is what is used: changing it changes the output (also through the tied output layer)
    params["tgt_embed.weight"] = params["tgt_embed.weight"] * 2
    assert not torch.allclose(functional_call(model, params, (src, tgt)), model(src, tgt))
    # gradients flow to the dict's tensors, with activation checkpointing on too
    checkpoint_blocks(model)
    params = {n: p.requires_grad_() for n, p in params.items()}
    out = functional_call(model, params, (src, tgt))
    grads = torch.autograd.grad(out.sum(), list(params.values()))
    assert all(g is not None and g.shape == p.shape for g, p in zip(grads, params.values()))


# -- GPT ---------------------------------------------------------------------------------------------------
def make_gpt(**kw):
    torch.manual_seed(0)
    return GPT(**{**dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), **kw})


def test_gpt_causal_and_shape():
    model = make_gpt().eval()
    idx = torch.randint(0, 50, (2, 10))
    logits = model(idx)
    assert logits.shape == (2, 10, 50)
    idx2 = idx.clone()
    idx2[:, 6] = (idx[:, 6] + 1) % 50
    logits2 = model(idx2)
    torch.testing.assert_close(logits2[:, :6], logits[:, :6], **TOL)
    assert (logits2[:, 6:] - logits[:, 6:]).abs().max() > 1e-3


def test_gpt_block_matches_manual():
    model = make_gpt().eval()
    blk = model.transformer.h[0]
    x = torch.randn(2, 5, 32)
    h = blk.ln_1(x)
    qkv = (h @ blk.attn.c_attn.weight.T + blk.attn.c_attn.bias).split(32, -1)
    q, k, v = (t.view(2, 5, 2, 16).transpose(1, 2) for t in qkv)
    a = ref_attention(q, k, v, causal_mask(5, 5)).transpose(1, 2).reshape(2, 5, 32)
    x1 = x + blk.attn.c_proj(a)
    torch.testing.assert_close(blk(x), x1 + blk.mlp(blk.ln_2(x1)), **TOL)


def test_gpt_mlp_uses_gelu_tanh():
    model = make_gpt().eval()
    mlp = model.transformer.h[0].mlp
    torch.nn.init.normal_(mlp.c_fc.weight, std=1.0)  # pre-activations of order 1, where the two GELUs differ
    x = torch.randn(2, 5, 32)
    u = mlp.c_fc(x)
    gelu_tanh = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
    torch.testing.assert_close(mlp(x), mlp.c_proj(gelu_tanh), **TOL)


def test_gpt2_preset_parameter_count_and_names():
    with torch.device("meta"):
        model = GPT.from_preset("gpt2", vocab_size=50257)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 124_439_808 - 1024 * 768  # nanoGPT's "123.65M"
    names = {n for n, _ in model.named_parameters()}
    for n in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.11.ln_1.weight",
              "transformer.h.11.attn.c_attn.weight", "transformer.h.11.attn.c_attn.bias",
              "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight",
              "transformer.h.0.mlp.c_proj.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]:
        assert n in names, n
    assert "lm_head.weight" not in names  # tied: listed once, as wte
    assert GPT_PRESETS["gpt2-xl"] == dict(n_layer=48, n_head=25, n_embd=1600)
    assert GPT_PRESETS["gpt2-medium"] == dict(n_layer=24, n_head=16, n_embd=1024)
    assert GPT_PRESETS["gpt2-large"] == dict(n_layer=36, n_head=20, n_embd=1280)
    with pytest.raises(ValueError, match="gpt2-xl"):
        GPT.from_preset("gpt3")


def test_gpt_tied_head_and_init():
    model = make_gpt(n_layer=4, n_embd=64, vocab_size=2000)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.bias is None
    std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    proj_std = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    assert std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max() == 0
    assert make_gpt(bias=False).transformer.ln_f.bias is None


def test_gpt_sequence_longer_than_block_size():
    model = make_gpt(block_size=8)
    model(torch.zeros(1, 8, dtype=torch.long))  # exactly block_size is fine
    with pytest.raises(ValueError, match=r"length 9.*block_size is 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_gpt_activation_checkpointing_and_functional_call():
    model = make_gpt(dropout=0.1).train()
    idx = torch.randint(0, 50, (2, 12))
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}

    def run():
        torch.manual_seed(5)
        out = functional_call(model, params, (idx,))
        return out, torch.autograd.grad(out.square().mean(), list(params.values()))

    calls = count_calls(model.transformer.h)
    logits, grads = run()
    checkpoint_blocks(model)
    logits_ckpt, grads_ckpt = run()
    assert len(calls) == 2 + 4  # blocks recomputed in backward
    torch.testing.assert_close(logits_ckpt, logits, rtol=0, atol=0)
    for g, gc in zip(grads, grads_ckpt):
        torch.testing.assert_close(gc, g, rtol=1e-6, atol=1e-7)


# -- initial parameters drawn per (seed, name, block of rows): thcore/weights.py -------------------------------

def test_rows_drawn_alone_equal_the_rows_of_the_whole(monkeypatch):
    """A rank drawing only its shard's rows gets exactly those rows of the whole parameter, wherever the shard
    boundaries fall against the seeded blocks (8-element blocks here, so every case crosses several)."""
    from thcore import weights
    monkeypatch.setattr(weights, "BLOCK", 8)
    model = GPT(vocab_size=37, block_size=8, n_layer=2, n_head=2, n_embd=4)
    for name, p in model.named_parameters():
        whole = weights.draw_rows(model, name, p.shape, p.dtype, seed=3)
        rows = p.shape[0]
        for lo, hi in [(0, rows), (1, rows), (0, rows // 2), (rows // 3, rows - 1), (rows - 1, rows), (5, 5)]:
            lo, hi = min(lo, rows), min(hi, rows)
            assert torch.equal(weights.draw_rows(model, name, p.shape, p.dtype, 3, lo, hi), whole[lo:hi]), name
        assert not torch.equal(whole, weights.draw_rows(model, name, p.shape, p.dtype, seed=4)) or \
            model.init_spec(name, p.shape)[0] == "const", name


def test_init_state_draws_each_param_from_its_seed_and_name():
    """init_state builds on the meta device and draws every param straight onto the device: the same seed gives
    the same params; the module holds the state's tensors (stored once); the specs are GPT-2's."""
    from thcore import init_state
    build = lambda: GPT(vocab_size=512, block_size=16, n_layer=4, n_head=2, n_embd=64)   # noqa: E731
    a, b, c = (init_state(build, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["transformer.wte.weight"], c.params["transformer.wte.weight"])
    assert all(p.data_ptr() == a.params[k].data_ptr() for k, p in a.model.named_parameters())
    assert a.model.lm_head.weight is a.model.transformer.wte.weight   # still tied
    std = lambda k: a.params[k].std().item()   # noqa: E731
    assert std("transformer.wte.weight") == pytest.approx(0.02, rel=0.02)
    assert std("transformer.h.0.attn.c_proj.weight") == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert torch.equal(a.params["transformer.ln_f.weight"], torch.ones(64))
    assert torch.equal(a.params["transformer.h.0.attn.c_attn.bias"], torch.zeros(192))


def test_transformer_built_on_meta_gets_its_sinusoidal_table():
    from thcore import init_state
    state = init_state(lambda: Transformer(11, 13, d_model=8, num_heads=2, num_encoder_layers=1,
                                           num_decoder_layers=1, d_ff=16, max_len=20))
    assert torch.equal(state.buffers["pos.pe"], SinusoidalPositionalEncoding(8, 20).pe)
    bound = math.sqrt(6 / (11 + 8))
    w = state.params["src_embed.weight"]
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound   # Xavier-uniform


def test_a_model_that_inits_itself_builds_whole_but_not_on_meta():
    from thcore import init_state
    from thcore.config import ConfigError
    build = lambda: torch.nn.Sequential(torch.nn.Linear(3, 2))   # noqa: E731
    a, b = init_state(build, seed=5), init_state(build, seed=5)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    with pytest.raises(ConfigError, match=r"Sequential: building on the meta device \(engines fsdp and deepspeed\) "
                                          r"needs the model to say how each parameter is drawn: init_spec"):
        init_state(build, device="meta")
