"""Models as definitions: one config object per family (JSON round trip, FLOP formula), activation checkpointing
applied from outside, one KV cache for both families, interop without engines."""
import json
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call

from thcore import decode, func, generate, perf
from thcore.models import GPT, GPTConfig, KVCache, Transformer, TransformerConfig
from thcore.remat import checkpoint_blocks, is_checkpointed, suspended


# -- the config: JSON round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    GPTConfig.preset("gpt2", vocab_size=50257, vocab_multiple=64, dropout=0.1),
    TransformerConfig(src_vocab_size=11, tgt_vocab_size=11, d_model=16, num_heads=2, pre_ln=True,
                      tie_embeddings=True, share_embeddings=True, activation="gelu"),
])
def test_config_json_round_trip(config):
    back = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and back.to_dict() == config.to_dict()
    assert dict(config) == config.to_dict() and config["dropout"] == config.dropout   # reads as its dict
    assert config == config.to_dict() and hash(back) == hash(config)
    assert config != {**config.to_dict(), "dropout": 0.5} and config != {"no_such_field": 1}
    with pytest.raises(ValueError, match="unknown field.*n_layers"):
        type(config).from_dict({**config.to_dict(), "n_layers": 3})
    model = config.build()
    assert model.config is config and type(model)(config).config == config


def test_old_model_json_without_new_fields_reads_with_defaults():
    # model.json of runs before vocabulary padding / before dropout was part of the shape
    old = {"vocab_size": 65, "block_size": 16, "n_layer": 1, "n_head": 2, "n_embd": 8, "bias": False}
    c = GPTConfig.from_dict(old)
    assert (c.vocab_multiple, c.dropout, c.rows) == (1, 0.0, 65)
    assert c == old   # a dict equals the config it reads as
    assert GPT(**old).config == c == GPT(c).config


# -- the FLOP formula: the config's, equal to the module count perf.py used to do ---------------------------
def _count(module):
    return sum(p.numel() for p in module.parameters())


def _old_gpt_flops_per_token(model, seq_len):
    n = _count(model) - _count(model.transformer.wpe)
    return 6.0 * n + 12.0 * len(model.transformer.h) * model.transformer.wte.embedding_dim * seq_len


def _old_transformer_flops(model, batch_size, src_len, tgt_len):
    d = model.src_embed.embedding_dim
    n_enc = _count(model.encoder) + _count(model.enc_norm)
    n_cross_kv = sum(_count(layer.cross_attn.k_proj) + _count(layer.cross_attn.v_proj) for layer in model.decoder)
    n_dec = _count(model.decoder) - n_cross_kv + _count(model.dec_norm)
    n_out = _count(model.generator)
    le, ld = len(model.encoder), len(model.decoder)
    src = 6.0 * (n_enc + n_cross_kv) + 12.0 * le * d * src_len
    tgt = 6.0 * (n_dec + n_out) + 12.0 * ld * d * (tgt_len + src_len)
    return batch_size * (src_len * src + tgt_len * tgt)


@pytest.mark.parametrize("config", [GPTConfig.preset("gpt2", vocab_size=50257, vocab_multiple=64),
                                    GPTConfig.preset("gpt2", vocab_size=50257, bias=False)])
def test_gpt_flops_equal_the_old_module_count(config):
    with torch.device("meta"):
        model = config.build()
    for T in (64, 1024):
        assert config.flops_per_token(T) == _old_gpt_flops_per_token(model, T) == perf.gpt_flops_per_token(model, T)
    batch = {"idx": torch.zeros(12, 1024, dtype=torch.long)}
    assert perf.step_flops(model, [batch, batch]) == 2 * 12 * 1024 * _old_gpt_flops_per_token(model, 1024)


@pytest.mark.parametrize("fields", [{}, dict(pre_ln=True, tie_embeddings=True),
                                    dict(share_embeddings=True, num_encoder_layers=2, num_decoder_layers=3)])
def test_transformer_flops_equal_the_old_module_count(fields):
    config = TransformerConfig(src_vocab_size=37000, tgt_vocab_size=37000, **fields)   # base, 37k joint BPE
    with torch.device("meta"):
        model = config.build()
    assert config.flops(8, 31, 27) == _old_transformer_flops(model, 8, 31, 27)
    batch = {"src": torch.ones(8, 31, dtype=torch.long), "tgt_in": torch.ones(8, 27, dtype=torch.long)}
    assert perf.step_flops(model, batch) == _old_transformer_flops(model, 8, 31, 27)


# -- activation checkpointing from outside ------------------------------------------------------------------
def _gpt():
    return GPT(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def _transformer():
    return Transformer(11, 13, d_model=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=2, d_ff=32,
                       dropout=0.2)


def _loss_and_grads(model, inputs):
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    torch.manual_seed(3)
    loss = functional_call(model, params, inputs).square().mean()
    return loss, torch.autograd.grad(loss, list(params.values()))


@pytest.mark.parametrize("build,inputs", [
    (_gpt, (torch.randint(0, 50, (2, 12)),)),
    (_transformer, (torch.randint(1, 11, (3, 6)), torch.randint(1, 13, (3, 5)))),
])
def test_checkpointing_from_outside_keeps_names_loss_and_grads(build, inputs):
    torch.manual_seed(0)
    model = build().train()
    keys, names = list(model.state_dict()), [n for n, _ in model.named_parameters()]
    loss, grads = _loss_and_grads(model, inputs)
    assert not is_checkpointed(model) and checkpoint_blocks(model) is model and is_checkpointed(model)
    checkpoint_blocks(model)   # twice: nothing more
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_parameters()] == names
    assert not hasattr(model, "activation_checkpointing")   # the model carries no flag
    loss_c, grads_c = _loss_and_grads(model, inputs)
    assert torch.equal(loss_c, loss)
    for g, gc in zip(grads, grads_c):
        torch.testing.assert_close(gc, g, rtol=1e-6, atol=1e-7)
    with suspended(model):   # torch.func's view: plain blocks, the same numbers
        assert not is_checkpointed(model)
        loss_s, _ = _loss_and_grads(model, inputs)
    assert is_checkpointed(model) and torch.equal(loss_s, loss)


def test_tasks_apply_checkpointing_where_the_recipe_asks():
    from thcore.tasks.translation import TranslationConfig, TranslationTask
    small = dict(d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=32, demo_train_size=64,
                 demo_valid_size=8, demo_test_size=8)
    for on in (False, True):
        task = TranslationTask(TranslationConfig(activation_checkpointing=on, **small), log=lambda m: None)
        assert is_checkpointed(task.build_model()) is on
        assert task.model_config.max_len == task.cfg.max_len + 1


# -- one KV cache for both families --------------------------------------------------------------------------
def _params(model):
    return {k: v.detach() for k, v in model.named_parameters()}, {k: v for k, v in model.named_buffers()}


def test_gpt_greedy_with_the_cache_equals_full_recompute():
    torch.manual_seed(0)
    model = _gpt().eval()
    params, buffers = _params(model)
    prompt = torch.randint(0, 50, (3, 4))
    cached = generate.generate(model, params, buffers, prompt, 10, temperature=0.0)
    full = generate.generate(model, params, buffers, prompt, 10, temperature=0.0, use_cache=False)
    assert torch.equal(cached, full)


def test_cache_grows_as_decoding_goes():
    """The cache's capacity doubles (16, 32, 64 positions): one token at a time equals the full forward."""
    torch.manual_seed(0)
    model = GPT(vocab_size=20, block_size=64, n_layer=1, n_head=2, n_embd=16).eval()
    idx = torch.randint(0, 20, (2, 50))
    cache = model.new_cache()
    with torch.no_grad():
        steps = torch.cat([model(idx[:, :3], cache=cache)] + [model(idx[:, t:t + 1], cache=cache)
                                                             for t in range(3, 50)], 1)
        torch.testing.assert_close(steps, model(idx), atol=1e-5, rtol=1e-5)
    assert cache.pos == 50 and cache.k[0].size(2) == 64


@pytest.mark.parametrize("family", ["gpt", "transformer"])
def test_cache_reordered_as_beam_search_does_equals_full_recompute(family):
    """Feed a prefix through the cache, keep other rows (beam search's reorder), go on: the logits are those of
    the reordered prefixes recomputed whole."""
    torch.manual_seed(0)
    model = (_gpt() if family == "gpt" else _transformer()).eval()
    params, buffers = _params(model)
    ys = torch.randint(1, 11, (4, 7))
    index = torch.tensor([2, 2, 0, 3])
    cache = model.new_cache()
    assert isinstance(cache, KVCache)
    if family == "gpt":
        def run(tokens, cache=None):
            return func.apply(model, params, buffers, tokens, cache=cache)
    else:
        memory, mask = func.apply(model, params, buffers, torch.randint(1, 11, (4, 5)), method="encode")

        def run(tokens, cache=None, rows=None):
            m, k = (memory, mask) if rows is None else (memory[rows], mask[rows])
            return func.apply(model, params, buffers, tokens, m, k, cache, method="decode")
    with torch.no_grad():
        run(ys[:, :4], cache)
        cache.reorder(index)
        if family == "gpt":
            step = run(ys[index, 4:], cache)
            whole = run(ys[index])
        else:
            step = run(ys[index, 4:], cache, index)
            whole = run(ys[index], None, index)
    assert cache.pos == 7
    torch.testing.assert_close(step, whole[:, 4:], atol=1e-5, rtol=1e-5)


def test_transformer_beam_search_with_the_cache_equals_full_recompute(monkeypatch):
    """decode.beam_search over the shared cache, against the same search re-decoding every prefix whole."""
    torch.manual_seed(0)
    model = _transformer().eval()
    params, buffers = _params(model)
    src = torch.randint(4, 11, (3, 6))
    cached = decode.beam_search(model, params, buffers, src, beam=3, max_len=8)

    real_step = decode._step
    # every step re-decodes the whole prefix (the cache is still made and reordered, never read)
    monkeypatch.setattr(decode, "_step", lambda m, p, b, ys, mem, mask, cache: real_step(m, p, b, ys, mem, mask, None))
    full = decode.beam_search(model, params, buffers, src, beam=3, max_len=8)
    assert cached == full


# -- interop never imports an engine --------------------------------------------------------------------------
def test_interop_and_export_import_no_engine():
    code = ("import sys, thcore.interop.hf_gpt2, thcore.export, thcore.consolidate, thcore.generate\n"
            "print([m for m in sys.modules if m.startswith('thcore.engines') or m == 'deepspeed'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
