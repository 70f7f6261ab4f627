"""Translation on real corpora: subword tokenizers, token-count batching, incremental decoding and
beam search, BLEU, `th.py translate` / `th.py eval`, the time budget and bad input."""
import json
import os
import random

import pytest
import torch

from helpers import DATA, multi30k_dir, th
from thcore import decode, func
from thcore.config import ConfigError
from thcore.data.loader import token_batches
from thcore.data.subword import Subword
from thcore.data.translation import collate, read_lines
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.metrics import read_jsonl
from thcore.models import Transformer
from thcore.scores import corpus_scores
from thcore.tasks.translation import TranslationTask

M30K = os.path.join(DATA, "multi30k-en-de")


def m30k(split: str, lang: str, n: int) -> list[str]:
    return read_lines(os.path.join(M30K, f"{split}.{lang}"), split)[:n]


ZH = ["我爱北京天安门。", "今天天气很好，我们去公园吧！", "他在图书馆里看书。", "这只猫很可爱。",
      "我们明天早上八点见面。", "她喜欢喝绿茶，不喜欢喝咖啡。"]


# --- tokenizers ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_subword_train_round_trip_and_save(kind, tmp_path):
    en, de = m30k("train", "en", 2000), m30k("train", "de", 2000)
    joint = Subword.train(en + de + ZH * 20, kind, 2000)
    assert len(joint) <= 2000 and [joint.tok.id_to_token(i) for i in range(4)] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    # encode -> decode gives back the text: subwords carry their spaces (Metaspace), Chinese needs none
    for line in en[:300] + de[:300] + ZH:
        ids = joint.encode(line)
        assert min(ids) >= 4 and joint.decode(ids + [2, 17, 18]) == line   # decoding stops at eos
    assert len(joint.encode(ZH[0])) > 1   # segmented without spaces
    joint.save(str(tmp_path / "tok.json"))
    again = Subword.load(str(tmp_path / "tok.json"))
    assert again.encode_batch(de[:50]) == joint.encode_batch(de[:50])
    separate = Subword.train(de, kind, 1000)   # one side alone
    assert all(separate.decode(separate.encode(line)) == line for line in de[:200])


def test_task_vocabularies_joint_separate_and_word(tmp_path):
    d = _data_dir(tmp_path, train=600, valid=20, test=20)
    base = dict(data_dir=d, vocab_size=800, max_steps=1, demo_train_size=1)
    joint = TranslationTask(_cfg(tmp_path / "j", tokenizer="bpe", joint_vocab=True, share_embeddings=True,
                                 tie_embeddings=True, **base))
    assert joint.src_vocab is joint.tgt_vocab and "bpe joint vocab" in joint.summary
    model = joint.build_model()
    assert model.src_embed.weight is model.tgt_embed.weight is model.generator.weight
    sep = TranslationTask(_cfg(tmp_path / "s", tokenizer="unigram", **base))
    assert sep.src_vocab is not sep.tgt_vocab
    word = TranslationTask(_cfg(tmp_path / "w", tokenizer="word", min_freq=2, **base))
    assert len(word.src_vocab) < len({w for line in m30k("train", "en", 600) for w in line.split()})
    # the saved vocabularies are the ones a resumed run (and th.py translate/eval) reads back
    os.makedirs(tmp_path / "j", exist_ok=True)   # the run directory holds the prepared corpus already
    joint.save_assets(str(tmp_path / "j"))
    back = TranslationTask(_cfg(tmp_path / "j", tokenizer="bpe", joint_vocab=True, **base), splits=("test",))
    assert set(back.data) == {"test"}
    assert back.tgt_vocab.encode_batch(m30k("test", "de", 20)) == joint.tgt_vocab.encode_batch(m30k("test", "de", 20))


# --- token-count batching --------------------------------------------------------------------------------------

def test_token_batches_fit_and_cover_each_example_once():
    rng = random.Random(0)
    sizes = [rng.randint(3, 60) for _ in range(3000)]
    seen_orders, counts = set(), set()
    for epoch in range(3):
        batches = token_batches(sizes, 700, epoch, seed=1)
        assert all(len(b) * max(sizes[i] for i in b) <= 700 for b in batches)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(sizes)))   # every example exactly once
        assert batches == token_batches(sizes, 700, epoch, seed=1)   # a function of (seed, epoch)
        seen_orders.add(tuple(flat))
        counts.add(len(batches))
    assert len(seen_orders) == 3 and len(counts) == 1   # reshuffled each epoch, same number of steps
    shards = [token_batches(sizes, 700, 0, seed=1, rank=r, world=2) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}
    with pytest.raises(ValueError, match="does not fit max_tokens=50"):
        token_batches([10, 60], 50, 0, 0)


def test_task_token_batches_padded_tensors_stay_within_max_tokens(tmp_path):
    cfg = _cfg(tmp_path / "r", data_dir=_data_dir(tmp_path, train=1500, valid=10, test=10), tokenizer="bpe",
               vocab_size=600, max_tokens=400, max_len=64, demo_train_size=1)
    task = TranslationTask(cfg)
    engine = EagerEngine(cfg)
    n = task.batches_per_epoch(1)
    batches = list(task.train_loader(1, 0, engine))
    assert len(batches) == n
    assert all(b["src"].numel() <= 400 and b["tgt_in"].numel() <= 400 for b in batches)
    assert sum(len(b["src"]) for b in batches) == len(task.data["train"])
    assert sum(len(b["src"]) for b in task.train_loader(1, n - 2, engine)) == \
        sum(len(b["src"]) for b in batches[n - 2:])   # a resumed epoch continues with the same batches


# --- decoding --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    """A small model fitted for a few steps to a toy copy-with-shift task, so that eos is predicted and
    hypotheses end at different lengths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny matrices: a second thread only adds synchronisation (slow on a busy machine)
    torch.manual_seed(0)
    random.seed(0)
    model = Transformer(40, 40, d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, d_ff=64,
                        dropout=0.0, max_len=64, tie_embeddings=True, share_embeddings=True, pre_ln=True)
    params, buffers = func.init(model)
    opt = torch.optim.Adam(params.values(), lr=3e-3)
    for p in params.values():
        p.requires_grad_(True)
    for _ in range(40):
        pairs = []
        for _ in range(16):
            n = random.randint(2, 9)
            s = torch.randint(4, 36, (n,))
            pairs.append((torch.cat([s, torch.tensor([2])]), s + 4))
        batch = collate(pairs)
        logits = func.apply(model, params, buffers, batch["src"], batch["tgt_in"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = {k: v.detach() for k, v in params.items()}
    src = collate([(torch.cat([torch.randint(4, 36, (n,)), torch.tensor([2])]), torch.zeros(0, dtype=torch.long))
                   for n in (3, 9, 5, 1, 7, 2, 8, 4)])["src"]
    yield model.eval(), params, buffers, src
    torch.set_num_threads(threads)


def test_incremental_decoding_equals_full_redecoding(tiny_model):
    model, params, buffers, src = tiny_model
    cached = decode.greedy(model, params, buffers, src, max_len=20, max_len_ratio=1.5)
    full = decode.greedy(model, params, buffers, src, max_len=20, max_len_ratio=1.5, use_cache=False)
    assert torch.equal(cached, full)
    # and the logits themselves: position by position through the cache == one pass over the whole prefix
    memory, mask = func.apply(model, params, buffers, src, method="encode")
    ys = torch.cat([torch.ones(len(src), 1, dtype=torch.long), cached.clamp(min=1)], dim=1)
    whole = func.apply(model, params, buffers, ys, memory, mask, method="decode")
    cache = model.new_cache()
    steps = [func.apply(model, params, buffers, ys[:, t:t + 1], memory, mask, cache, method="decode")
             for t in range(ys.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)
    # a cache fed two tokens at once (causal mask offset by the cached prefix) agrees too
    cache = model.new_cache()
    first = func.apply(model, params, buffers, ys[:, :3], memory, mask, cache, method="decode")
    rest = func.apply(model, params, buffers, ys[:, 3:5], memory, mask, cache, method="decode")
    torch.testing.assert_close(torch.cat([first, rest], 1), whole[:, :5], atol=1e-5, rtol=1e-5)


def test_beam_one_equals_greedy_and_wider_beams_score_at_least_as_well(tiny_model):
    model, params, buffers, src = tiny_model
    greedy = [decode.strip(h) for h in decode.greedy(model, params, buffers, src, max_len=20, max_len_ratio=1.5)]
    assert decode.beam_search(model, params, buffers, src, beam=1, max_len=20, max_len_ratio=1.5) == greedy
    assert any(len(h) < 20 for h in greedy)   # the model stops by itself: the test covers eos handling

    def logprob(hyps):
        tgt = collate([(torch.zeros(1, dtype=torch.long), torch.tensor(h, dtype=torch.long)) for h in hyps])
        logits = func.apply(model, params, buffers, src, tgt["tgt_in"])
        lp = torch.log_softmax(logits, -1).gather(-1, tgt["targets"].clamp(min=0)[..., None])[..., 0]
        return (lp * (tgt["targets"] != -100)).sum(1)
    wide = decode.beam_search(model, params, buffers, src, beam=4, max_len=20, max_len_ratio=1.5,
                              length_penalty=0.0)
    assert bool((logprob(wide) >= logprob(greedy) - 1e-4).all())
    assert decode.limits(src, 20, 1.5).tolist() == [min(20, int(n * 1.5) + 10) for n in (src != 0).sum(1).tolist()]


def test_corpus_scores_are_sacrebleu():
    import sacrebleu
    hyps, refs = ["Ein Hund läuft im Park .", "Zwei Männer."], ["Ein Hund rennt im Park.", "Zwei Männer."]
    scores = corpus_scores(hyps, refs)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert "tok:13a" in scores["bleu_signature"] and "nrefs:1" in scores["chrf_signature"]


# --- a real run, end to end ------------------------------------------------------------------------------------

def _data_dir(tmp_path, train=3000, valid=100, test=60, name="m30k"):
    """The first lines of Multi30k in a temporary directory named as --data_dir expects."""
    return multi30k_dir(tmp_path, train, valid, test, name)


def _cfg(out, **kw):
    from helpers import TINY
    from thcore.config import from_dict
    from thcore.tasks.translation import TranslationConfig
    return from_dict(TranslationConfig, {**TINY, "name": "t", "out_dir": str(out), **kw})


def test_time_budget_stops_with_a_checkpoint_and_test_scores(tmp_path):
    d = _data_dir(tmp_path, train=400, valid=20, test=20)
    cfg = _cfg(tmp_path / "run", data_dir=d, tokenizer="bpe", vocab_size=500, joint_vocab=True, max_tokens=300,
               max_len=64, max_minutes=0.0001, max_steps=1000, log_every=2, lr_schedule="cosine")
    task = TranslationTask(cfg)
    state = fit(cfg, task, EagerEngine(cfg))
    assert state.step == 2   # the first log step is past the budget
    meta = json.load(open(os.path.join(cfg.run_dir, "checkpoints", "step_2", "state.json")))
    assert meta["elapsed_s"] > 0
    assert [r["split"] for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl"))][-2:] == ["val", "test"]


# --- bad input -------------------------------------------------------------------------------------------------

def test_empty_lines_skipped_and_counted_invalid_utf8_named(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.en").write_text("a cat\n\nthe dog\n \nred fox\n")
    (d / "train.de").write_text("eine katze\nleer\nder hund\nauch leer\n\n")
    task = TranslationTask(_cfg(tmp_path / "r", data_dir=str(d), tokenizer="bpe", vocab_size=60))
    train = task.data["train"]   # prepared into the run directory; decoded back to the kept lines
    assert [(task.src_vocab.decode(s.tolist()), task.tgt_vocab.decode(t.tolist() + [2])) for s, t in train.pairs] \
        == [("a cat", "eine katze"), ("the dog", "der hund")]
    assert len(task.data["train"]) == 2 and "3 empty lines skipped" in task.summary
    (d / "valid.en").write_bytes(b"ok\nalso ok\n\xc3\x28 bad\n")
    (d / "valid.de").write_text("gut\nauch gut\nschlecht\n")
    with pytest.raises(ConfigError, match=rf"valid_src: {d}/valid.en:3: not valid UTF-8"):
        TranslationTask(_cfg(tmp_path / "r", data_dir=str(d)))
    p = th("run", "recipes/multi30k_en_de.py", f"--data_dir={d}", f"--out_dir={tmp_path / 'o'}", "--engine=eager",
           check=False, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == f"error: valid_src: {d}/valid.en:3: not valid UTF-8"


def test_bad_translation_config_and_input(tmp_path):
    with pytest.raises(ConfigError, match="share_embeddings=True: needs joint_vocab=True"):
        _cfg(tmp_path, share_embeddings=True)
    with pytest.raises(ConfigError, match="max_tokens=50: must be >= max_len=100"):
        _cfg(tmp_path, max_tokens=50)
    with pytest.raises(ConfigError, match="data_dir='/nonexistent': not a directory"):
        _cfg(tmp_path, data_dir="/nonexistent")
    with pytest.raises(ConfigError, match="tokenizer='sentencepiece': must be one of"):
        _cfg(tmp_path, tokenizer="sentencepiece")
    with pytest.raises(ConfigError, match="cuda_graphs=True: translation batches vary in shape"):
        _cfg(tmp_path, cuda_graphs=True)
    p = th("translate", str(tmp_path), check=False, input="hello\n")
    assert p.returncode == 2 and p.stderr.strip() == f"error: run_dir: {tmp_path}: no config.json (not a run directory)"
