"""GPT language modelling: prepare, random windows and mixing, training, best checkpoint / early stop, KV-cache
generation, Hugging Face GPT-2 weights in and out (CPU, fp32)."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import DATA, shakespeare_chars, th
from thcore import checkpoint
from thcore.config import ConfigError, from_dict
from thcore.data import lm as lm_data
from thcore.engines.eager import EagerEngine
from thcore.generate import generate
from thcore.interop import hf_gpt2
from thcore.loop import Interrupted, fit
from thcore.metrics import read_jsonl
from thcore.models.gpt import GPT
from thcore.tasks.lm import LMConfig, LMTask

SHAKESPEARE = os.path.join(DATA, "tinyshakespeare", "input.txt")
GPT2_TOK = os.path.join(DATA, "gpt2-tokenizer")
TINY_LM = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0, batch_size=16, lr=3e-3, warmup_steps=10,
               eval_iters=4, log_every=10)


def decode_bin(directory, split, tok):
    return tok.decode(np.fromfile(os.path.join(directory, f"{split}.bin"), dtype=np.uint16).tolist())


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    """The first 200k characters of tiny Shakespeare, prepared char-level."""
    return shakespeare_chars(tmp_path_factory, 200_000)


def lm_config(tmp_path, data_dir, **kw):
    return from_dict(LMConfig, {"name": "tinylm", "out_dir": str(tmp_path / "run"), "data_dir": data_dir,
                                **TINY_LM, **kw})


def train(cfg, task=None):
    return fit(cfg, task or LMTask(cfg), EagerEngine(cfg))


def best_loss(run_dir):
    """The best val loss so far, as the newest checkpoint's state.json records it (the evaluator's state)."""
    return json.load(open(os.path.join(checkpoint.pick(run_dir, "latest"), "state.json")))["best"]


# -- prepare ---------------------------------------------------------------------------------------------
def test_prepare_char_roundtrip(tmp_path):
    text = open(SHAKESPEARE).read()
    out = tmp_path / "char"
    p = th("prepare", f"--input={SHAKESPEARE}", f"--out={out}", "--tokenizer=char")
    assert p.stdout == ""   # the summary goes to stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["tokenizer"]["kind"] == "char"
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)   # nanoGPT's shakespeare_char
    tok = lm_data.load_tokenizer(str(out))
    n = int(len(text) * 0.9)
    assert decode_bin(out, "train", tok) == text[:n] and decode_bin(out, "val", tok) == text[n:]
    assert not list(out.glob("*.pkl"))


def test_prepare_gpt2_bpe_roundtrip(tmp_path):
    text = open(SHAKESPEARE).read()
    out = tmp_path / "bpe"
    meta = lm_data.prepare(SHAKESPEARE, str(out), "gpt2", GPT2_TOK)
    assert meta["vocab_size"] == 50257 and meta["tokenizer"]["eot"] == 50256
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)   # nanoGPT's shakespeare numbers
    tok = lm_data.load_tokenizer(str(out))   # from the prepared dir alone: vocab.json / merges.txt copied there
    assert tok.encode("Hello world!") == [15496, 995, 0]
    n = int(len(text) * 0.9)
    assert decode_bin(out, "train", tok) == text[:n] and decode_bin(out, "val", tok) == text[n:]


def test_prepare_bad_input(tmp_path):
    p = th("prepare", "--input=/nonexistent.txt", f"--out={tmp_path / 'x'}", check=False)
    assert p.returncode == 2 and p.stderr.strip() == "error: input: file not found: /nonexistent.txt"
    with pytest.raises(ConfigError, match="tokenizer_dir: required"):
        lm_data.prepare(SHAKESPEARE, str(tmp_path / "y"), "gpt2")
    with pytest.raises(ConfigError, match="data_dir: required"):
        from_dict(LMConfig, {})
    with pytest.raises(ConfigError, match="n_embd=30 must be divisible by n_head=4"):
        from_dict(LMConfig, {"data_dir": "x", "n_embd": 30, "n_head": 4})


# -- windows and mixing ----------------------------------------------------------------------------------
def _arrays(tmp_path):
    """Two token files: A holds ids 0..9 (1,000 tokens), B ids 10..19 (50,000 tokens)."""
    out = []
    for name, lo, n in (("a", 0, 1_000), ("b", 10, 50_000)):
        path = tmp_path / f"{name}.bin"
        np.asarray(np.arange(n) % 10 + lo, dtype=np.uint16).tofile(path)
        out.append(np.memmap(path, dtype=np.uint16, mode="r"))
    return out


def test_windows_are_shifted_and_deterministic(tmp_path):
    mix = lm_data.TokenMix(_arrays(tmp_path)[:1], [1.0], block_size=8)
    b = mix.batch(4, seed=7)
    assert b["idx"].shape == b["targets"].shape == (4, 8) and b["idx"].dtype == torch.long
    assert torch.equal(b["targets"][:, :-1], b["idx"][:, 1:])
    assert torch.equal((b["idx"] + 1) % 10, b["targets"])   # the next token of the file
    assert torch.equal(mix.batch(4, seed=7)["idx"], b["idx"])
    assert not torch.equal(mix.batch(4, seed=8)["idx"], b["idx"])


def test_weighted_mix_draws_in_proportion(tmp_path):
    """0.3 / 0.7 of the rows, though B is 50x larger than A; each row comes whole from its own source."""
    mix = lm_data.TokenMix(_arrays(tmp_path), [0.3, 0.7], block_size=16)
    rows_a = rows = 0
    for i in range(100):
        x, y, source = mix.sample(64, seed=i)
        from_a = x.max(1).values < 10
        assert torch.equal(from_a, source == 0) and torch.equal(from_a, (x.min(1).values < 10))
        rows_a += int(from_a.sum())
        rows += len(x)
    assert abs(rows_a / rows - 0.3) < 0.02, rows_a / rows   # 6,400 rows: std 0.006


def test_datasets_config_mixes_prepared_dirs(tmp_path, char_data):
    other = tmp_path / "other"   # the same characters (so the same char vocabulary), in another order
    lines = open(os.path.join(os.path.dirname(char_data), "small.txt")).read().splitlines(keepends=True)
    (tmp_path / "o.txt").write_text("".join(reversed(lines)))
    lm_data.prepare(str(tmp_path / "o.txt"), str(other), "char")
    cfg = lm_config(tmp_path, "", datasets={char_data: 1, str(other): 3})
    task = LMTask(cfg)
    assert task.train.weights.tolist() == [0.25, 0.75] and "x0.75" in task.summary
    bpe = tmp_path / "bpe"
    lm_data.prepare(str(tmp_path / "o.txt"), str(bpe), "gpt2", GPT2_TOK)
    with pytest.raises(ConfigError, match="another tokenizer"):
        LMTask(lm_config(tmp_path, "", datasets={char_data: 1, str(bpe): 1}))
    (tmp_path / "z.txt").write_text("zebra\n" * 100)   # a char vocabulary of its own: ids would mean other characters
    lm_data.prepare(str(tmp_path / "z.txt"), str(tmp_path / "z"), "char")
    with pytest.raises(ConfigError, match="another tokenizer"):
        LMTask(lm_config(tmp_path, "", block_size=8, datasets={char_data: 1, str(tmp_path / "z"): 1}))


# -- training --------------------------------------------------------------------------------------------
def test_tiny_gpt_learns_and_logs_ppl(tmp_path, char_data):
    cfg = lm_config(tmp_path, char_data, max_steps=150, eval_every=50)
    state = train(cfg)
    rows = read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [50, 100, 150]
    first_train = next(r for r in rows if r["split"] == "train")
    assert first_train["step"] == 10 and first_train["loss"] > 3.3, first_train   # ln(65) = 4.17 at the start
    # the bars hold for every one of seeds 0-9 (at most 3.33 at step 50, 2.94 at step 150, whichever init draw):
    # below the characters' unigram entropy (~3.3 nats) by the end, and falling
    assert val[0]["loss"] < 3.4 and val[-1]["loss"] < 3.0 and val[-1]["loss"] < val[0]["loss"] - 0.2, val
    for r in val:
        assert r["ppl"] == pytest.approx(np.exp(r["loss"])) and r["train_loss"] > 0
    assert best_loss(cfg.run_dir) == min(r["loss"] for r in val)
    assert json.load(open(os.path.join(cfg.run_dir, "model.json")))["vocab_size"] == 62   # this slice's characters


def test_resume_draws_the_same_windows(tmp_path, char_data):
    """Cut at step 13 and resumed: bitwise the run that never stopped (windows from (seed, epoch, index, rank))."""
    from helpers import stop_after
    ref = train(lm_config(tmp_path, char_data, max_steps=30, checkpoint_every=10, out_dir=str(tmp_path / "ref")))
    cfg = lm_config(tmp_path, char_data, max_steps=30, checkpoint_every=10, out_dir=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        train(cfg, stop_after(LMTask(cfg), 13))
    resumed = train(cfg)
    assert resumed.step == 30
    for k in ref.params:
        assert torch.equal(ref.params[k], resumed.params[k]), k


def test_async_checkpoints_equal_the_synchronous_ones_and_resume_the_same(tmp_path, char_data):
    """async_checkpoint=True: every checkpoint's tensors and state.json equal a synchronous run's, and a run cut
    at step 13 and resumed from them ends bitwise where the uninterrupted run ends."""
    from helpers import stop_after
    runs = {}
    for name, kw in (("sync", {}), ("async", {"async_checkpoint": True})):
        cfg = lm_config(tmp_path, char_data, max_steps=30, checkpoint_every=10, keep_checkpoints=5,
                        out_dir=str(tmp_path / name), **kw)
        runs[name] = train(cfg), cfg.run_dir
    cut = lm_config(tmp_path, char_data, max_steps=30, checkpoint_every=10, async_checkpoint=True,
                    out_dir=str(tmp_path / "cut"))
    with pytest.raises(Interrupted):
        train(cut, stop_after(LMTask(cut), 13))
    resumed = train(cut)
    for step in (10, 20, 30):
        a, b = (checkpoint.step_dir(runs[n][1], step) for n in ("sync", "async"))
        checkpoint.verify(b)
        for f in ("model.safetensors", "optimizer.safetensors"):
            assert open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read(), (step, f)
        assert json.load(open(os.path.join(a, "state.json"))) == json.load(open(os.path.join(b, "state.json")))
    ref = runs["sync"][0]
    assert resumed.step == 30 and all(torch.equal(ref.params[k], resumed.params[k]) for k in ref.params)


class Scripted(LMTask):
    """An LM task whose val losses are given per eval, to test the loop's bookkeeping exactly."""

    def __init__(self, cfg, losses):
        super().__init__(cfg)
        self.losses = list(losses)

    def evaluate(self, state, split="valid", **ranks):
        return {"loss": self.losses.pop(0)} if split == "valid" and self.losses else {}


def _ckpts(cfg):
    return sorted(n for n in os.listdir(os.path.join(cfg.run_dir, "checkpoints")) if n.startswith("step_"))


def test_best_checkpoint_survives_pruning_and_early_stop(tmp_path, char_data):
    # evals at 5, 10, 15, 20: best at 10, then two evals without improvement = patience 2: stop at 20 of 50
    cfg = lm_config(tmp_path, char_data, max_steps=50, eval_every=5, keep_checkpoints=1, early_stop_patience=2,
                    always_save_checkpoint=False)
    state = train(cfg, Scripted(cfg, [3.0, 2.0, 2.5, 2.1, 1.0]))
    assert state.step == 20 and best_loss(cfg.run_dir) == 2.0
    # step_5 saved (then best) and pruned; 15 not saved (no improvement); 10 kept though keep_checkpoints=1
    assert _ckpts(cfg) == ["step_10", "step_20"]
    assert checkpoint.best(cfg.run_dir) == os.path.join(cfg.run_dir, "checkpoints", "step_10")
    meta = json.load(open(os.path.join(cfg.run_dir, "checkpoints", "step_20", "state.json")))
    assert (meta["best_step"], meta["stale_evals"], meta["best"]) == (10, 2, 2.0)
    assert hf_gpt2.run_checkpoint(cfg.run_dir) == checkpoint.best(cfg.run_dir)   # export/generate read the best
    # the same command again: the stopped run stays stopped
    assert train(cfg, Scripted(cfg, [0.5])).step == 20


def test_always_save_checkpoint_and_patience_off(tmp_path, char_data):
    cfg = lm_config(tmp_path, char_data, max_steps=20, eval_every=5, keep_checkpoints=10)
    state = train(cfg, Scripted(cfg, [3.0, 2.0, 2.5, 2.6]))
    assert state.step == 20 and _ckpts(cfg) == ["step_10", "step_15", "step_20", "step_5"]
    assert checkpoint.best(cfg.run_dir).endswith("step_10")


# -- generation ------------------------------------------------------------------------------------------
def _random_gpt(**kw):
    torch.manual_seed(0)
    model = GPT(**{**dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True), **kw}).eval()
    return model, {k: v.detach() for k, v in model.named_parameters()}


def test_kv_cache_logits_equal_full_forward():
    model, params = _random_gpt()
    idx = torch.randint(0, 40, (3, 16))
    full = model(idx)
    cache = model.new_cache(3)
    parts = [model(idx[:, :5], cache=cache), model(idx[:, 5:6], cache=cache), model(idx[:, 6:11], cache=cache)]
    parts += [model(idx[:, t:t + 1], cache=cache) for t in range(11, 16)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="length 17.*block_size is 16"):
        model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (1.0, 0), (0.8, 5)])
def test_kv_cache_generation_equals_uncached(temperature, top_k):
    """40 new tokens after a 3-token prompt: past block_size (16), where the window slides."""
    model, params = _random_gpt()
    prompt = torch.randint(0, 40, (2, 3))
    out = [generate(model, params, {}, prompt, 40, temperature, top_k, torch.Generator().manual_seed(1), cache)
           for cache in (True, False)]
    assert out[0].shape == (2, 43) and torch.equal(out[0][:, :3], prompt)
    assert torch.equal(out[0], out[1])
    if temperature == 0:   # greedy: each token is the argmax of the model's logits over the last block
        x = out[1][:, :-1][:, -16:]
        assert torch.equal(model(x)[:, -1].argmax(-1), out[1][:, -1])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, char_data):
    out = tmp_path_factory.mktemp("tinyrun")
    cfg = lm_config(out, char_data, max_steps=40, eval_every=20)
    state = train(cfg)
    return cfg.run_dir, state


def test_generate_cli_only_text_on_stdout(tiny_run):
    run_dir, _ = tiny_run
    p = th("generate", run_dir, "--prompt=ROMEO:", "--max_new_tokens=50", "--temperature=0")
    assert len(p.stdout) == 51 and p.stdout.endswith("\n")   # 50 characters and a newline
    assert "loaded" in p.stderr
    again = th("generate", run_dir, "--prompt=ROMEO:", "--max_new_tokens=50", "--temperature=0")
    assert again.stdout == p.stdout
    bad = th("generate", run_dir, "--prompt=ROMEO@", check=False)
    assert bad.returncode == 2 and "'@' is not in this 62-character vocabulary" in bad.stderr


# -- Hugging Face GPT-2 ----------------------------------------------------------------------------------
SHAPES = [dict(vocab_size=50, n_positions=32, n_layer=2, n_head=2, n_embd=32),
          dict(vocab_size=97, n_positions=16, n_layer=3, n_head=4, n_embd=64),
          dict(vocab_size=10, n_positions=8, n_layer=1, n_head=1, n_embd=8)]


def _hf_model(shape, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()
    with torch.no_grad():   # HF initializes biases to 0 and LayerNorms to 1: randomize so a mix-up shows
        for n, p in hf.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hf


def _our_logits(args, params, idx):
    with torch.device("meta"):
        model = GPT(**args)
    from thcore import func
    return func.apply(model.eval(), params, {}, idx)


@pytest.mark.parametrize("shape", SHAPES)
def test_import_hf_gpt2_logits_match(tmp_path, shape):
    hf = _hf_model(shape)
    hf.save_pretrained(tmp_path)
    args, params, _ = hf_gpt2.load_gpt(str(tmp_path))
    assert args == dict(vocab_size=shape["vocab_size"], block_size=shape["n_positions"], n_layer=shape["n_layer"],
                        n_head=shape["n_head"], n_embd=shape["n_embd"], bias=True)
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]))
    with torch.no_grad():
        ref = hf(idx).logits
    assert (_our_logits(args, params, idx) - ref).abs().max() <= 1e-4


def test_import_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The hub's `gpt2` files were saved from GPT2Model: no `transformer.` prefix, `h.N.attn.bias` buffers."""
    shape = SHAPES[0]
    hf = _hf_model(shape)
    sd = {k[len("transformer."):]: v.contiguous() for k, v in hf.state_dict().items() if k.startswith("transformer.")}
    for i in range(shape["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", **shape}))
    args, params, _ = hf_gpt2.load_gpt(str(tmp_path))
    idx = torch.randint(0, 50, (2, 32))
    with torch.no_grad():
        assert (_our_logits(args, params, idx) - hf(idx).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_export_to_hf_logits_match(tmp_path, bias):
    transformers = pytest.importorskip("transformers")
    model, params = _random_gpt(bias=bias, vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.1)
    save_file(hf_gpt2.to_hf(params, 3), tmp_path / "model.safetensors")
    args = dict(vocab_size=50, block_size=16, n_layer=3, n_head=4, n_embd=32)
    (tmp_path / "config.json").write_text(json.dumps(hf_gpt2.hf_config(args)))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() <= 1e-4


def test_export_cli_then_init_from_and_generate(tmp_path, tiny_run, char_data):
    """th.py export --format=hf of a run, loaded by transformers; that dir fine-tunes (init_from) and generates."""
    transformers = pytest.importorskip("transformers")
    run_dir, state = tiny_run
    out = tmp_path / "hf"
    th("export", run_dir, str(out), "--format=hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 62, (2, 32))
    args, params, ckpt = hf_gpt2.load_gpt(run_dir)
    assert ckpt == checkpoint.best(run_dir)
    with torch.no_grad():
        assert (hf(idx).logits - _our_logits(args, params, idx)).abs().max() <= 1e-4
    # staged training from the exported weights: same start, a fresh optimizer, step 0
    cfg = lm_config(tmp_path, char_data, init_from=str(out), n_layer=1, max_steps=2, eval_every=1, lr=1e-9,
                    warmup_steps=0, lr_schedule="constant")
    task = LMTask(cfg)
    assert task.model_args["n_layer"] == 2   # the shape comes from init_from
    start = task.init_state(2)
    assert start.step == 0 and all(torch.equal(start.params[k], params[k]) for k in params)
    assert all(float(v.abs().sum()) == 0 for v in start.opt_state["exp_avg"].values())
    train(cfg)
    val = [r for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["split"] == "val"]
    # the same eval batches (same seed) as the exported run's best eval: the same loss, not ln(62) = 4.13
    assert val[0]["step"] == 1 and val[0]["loss"] == pytest.approx(best_loss(run_dir), abs=1e-3)
    # generate from the HF dir: its meta.json (copied by export) is the tokenizer
    p = th("generate", str(out), "--prompt=ROMEO:", "--max_new_tokens=20", "--temperature=0")
    q = th("generate", run_dir, "--prompt=ROMEO:", "--max_new_tokens=20", "--temperature=0")
    assert p.stdout == q.stdout and len(p.stdout) == 21


def test_generate_from_hf_dir_with_gpt2_tokenizer(tmp_path):
    hf = _hf_model(dict(vocab_size=50257, n_positions=32, n_layer=1, n_head=2, n_embd=8))
    hf.save_pretrained(tmp_path / "hf")
    p = th("generate", tmp_path / "hf", f"--tokenizer_dir={GPT2_TOK}", "--prompt=Hello", "--max_new_tokens=5",
           "--temperature=0")
    tok = lm_data.GPT2Tokenizer(GPT2_TOK)
    ids = torch.tensor([tok.encode("Hello")])
    for _ in range(5):   # greedy with transformers itself
        with torch.no_grad():
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert p.stdout == tok.decode(ids[0, 1:].tolist()) + "\n"
    missing = th("generate", tmp_path / "hf", "--max_new_tokens=1", check=False)
    assert missing.returncode == 2 and "tokenizer_dir: required" in missing.stderr


# -- vocabulary padding (GPT-2 BPE: 50257 real tokens in 50304 rows) -------------------------------------
BPE_LM = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, eval_iters=2, log_every=2,
              warmup_steps=0, lr_schedule="constant")   # constant: a run cut short follows the same rates


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """The first 20k characters of tiny Shakespeare, GPT-2 BPE."""
    d = tmp_path_factory.mktemp("bpe")
    (d / "small.txt").write_text(open(SHAKESPEARE).read()[:20_000])
    lm_data.prepare(str(d / "small.txt"), str(d / "bpe"), "gpt2", GPT2_TOK)
    return str(d / "bpe")


def bpe_config(tmp_path, data_dir, name, **kw):
    return lm_config(tmp_path, data_dir, **{**BPE_LM, "out_dir": str(tmp_path / name), **kw})


def test_gpt2_bpe_runs_pad_to_64_and_export_the_hf_layout(tmp_path, bpe_data, char_data):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from thcore import generate as gen
    assert LMTask(lm_config(tmp_path, char_data)).model_args["vocab_multiple"] == 1   # char vocabularies stay
    cfg = bpe_config(tmp_path, bpe_data, "run", max_steps=2, eval_every=2)
    task = LMTask(cfg)
    assert task.model_args["vocab_multiple"] == 64 and "vocab 50257 (gpt2), 50304 rows" in task.summary
    state = train(cfg, task)
    assert state.params["transformer.wte.weight"].shape == (50304, 16)
    assert json.load(open(os.path.join(cfg.run_dir, "model.json")))["vocab_multiple"] == 64
    out = tmp_path / "hf"
    th("export", cfg.run_dir, str(out), "--format=hf")
    assert load_file(out / "model.safetensors")["transformer.wte.weight"].shape == (50257, 16)
    assert json.load(open(out / "config.json"))["vocab_size"] == 50257
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    model, params, _ = gen.load(cfg.run_dir)   # the padded run, as generate reads it
    idx = torch.tensor([[50256, 0, 1, 50000, 13, 50255]])
    with torch.no_grad():
        ours = _our_logits(hf_gpt2.load_gpt(cfg.run_dir)[0], params, idx)
        assert ours.shape == (1, 6, 50257) and (hf(idx).logits - ours).abs().max() <= 1e-4
    out_ids = gen.generate(model, params, {}, idx, 8, 1.0, 0, torch.Generator().manual_seed(0))
    assert out_ids.shape == (1, 14) and int(out_ids.max()) < 50257


def test_unpadded_checkpoint_resumes_to_the_same_numbers(tmp_path, bpe_data):
    """A GPT-2 BPE run written before padding was the default (50257 rows; model.json and config.json without
    vocab_multiple) resumes bitwise as the run that never stopped; a new run from it is padded on read."""
    ref = train(bpe_config(tmp_path, bpe_data, "ref", vocab_multiple=1, max_steps=4, eval_every=4))
    old = bpe_config(tmp_path, bpe_data, "old", vocab_multiple=1, max_steps=2, eval_every=2)
    train(old)
    for name in ("model.json", "config.json"):   # as the previous version wrote them
        path = os.path.join(old.run_dir, name)
        values = json.load(open(path))
        values.pop("vocab_multiple")
        json.dump(values, open(path, "w"))
    from safetensors.torch import load_file
    from thcore import generate as gen
    hf_gpt2.export(old.run_dir, str(tmp_path / "old_hf"))   # export and generate read it as it is
    assert load_file(tmp_path / "old_hf" / "model.safetensors")["transformer.wte.weight"].shape == (50257, 16)
    model, params, _ = gen.load(old.run_dir)
    assert gen.generate(model, params, {}, torch.tensor([[50256]]), 4, 0.0).shape == (1, 5)
    cfg = bpe_config(tmp_path, bpe_data, "old", max_steps=4, eval_every=4)   # today's default: vocab_multiple=0
    notes = []
    task = LMTask(cfg, log=lambda *a, **k: notes.append(" ".join(map(str, a))))
    assert notes == ["note: the checkpoint to resume holds 50257 token rows (written without vocabulary padding): "
                     "this run keeps them (vocab_multiple=1); init_from pads them to 50304 in a new run"]
    resumed = train(cfg, task)
    assert resumed.step == 4 and all(torch.equal(ref.params[k], resumed.params[k]) for k in ref.params)
    assert json.load(open(os.path.join(old.run_dir, "model.json")))["vocab_multiple"] == 1
    with pytest.raises(ConfigError, match=r"^vocab_multiple=64: the checkpoint to resume holds 50257 unpadded "
                                          r"token rows; resume it with vocab_multiple=1"):
        LMTask(bpe_config(tmp_path, bpe_data, "old", vocab_multiple=64, max_steps=6))
    # a new run from those weights: padded on read with zero rows, the real rows as trained
    new = LMTask(bpe_config(tmp_path, bpe_data, "new", init_from=old.run_dir), log=lambda *a, **k: None)
    wte = new.init_state(1).params["transformer.wte.weight"]
    assert wte.shape == (50304, 16) and torch.equal(wte[:50257], resumed.params["transformer.wte.weight"])
    assert not wte[50257:].any()


def test_pad_rows_never_get_probability_mass():
    """Pad rows made to win every logit if they were scored: logits, samples and the loss (plain and chunked)
    see only the vocab_size real tokens, as the unpadded model with the same weights."""
    from thcore import func
    from thcore.step import loss_fn
    shape = dict(vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    padded, plain = GPT(**shape, vocab_multiple=64).eval(), GPT(**shape).eval()
    with torch.no_grad():
        padded.transformer.ln_f.bias.fill_(1.0)   # every feature vector has mean 1 ...
        padded.transformer.wte.weight[100:] = 10.0   # ... so each pad row's logit would be ~160
    params = {k: v.detach() for k, v in padded.named_parameters()}
    real = {**params, "transformer.wte.weight": params["transformer.wte.weight"][:100]}
    idx = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = func.apply(padded, params, {}, idx)
        assert logits.shape == (4, 16, 100)
        torch.testing.assert_close(logits, func.apply(plain, real, {}, idx), rtol=0, atol=1e-5)
        full = padded.lm_head(padded.features(idx))   # what the pad rows would say
        assert full.shape[-1] == 128 and (full.argmax(-1) >= 100).all()
    out = generate(padded, params, {}, idx[:, :4], 12, temperature=1.0, top_k=0,
                   generator=torch.Generator().manual_seed(0))
    assert int(out.max()) < 100
    batch = {"idx": idx, "targets": torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(2))}
    want, _ = loss_fn(plain, real, {}, batch)
    for chunk in (0, 24):
        got, _ = loss_fn(padded, params, {}, batch, ce_chunk=chunk)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_mfu_counts_the_padded_rows_the_output_layer_multiplies():
    """FLOPs per token of a padded run equal those of nanoGPT's 50304-token model (the same matmuls)."""
    from thcore.perf import gpt_flops_per_token
    shape = dict(block_size=64, n_layer=1, n_head=2, n_embd=64)
    with torch.device("meta"):
        padded = GPT(vocab_size=50257, vocab_multiple=64, **shape)
        nanogpt, unpadded = GPT(vocab_size=50304, **shape), GPT(vocab_size=50257, **shape)
    assert gpt_flops_per_token(padded, 64) == gpt_flops_per_token(nanogpt, 64)
    assert gpt_flops_per_token(padded, 64) == gpt_flops_per_token(unpadded, 64) + 6 * 47 * 64
