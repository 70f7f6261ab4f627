"""Corpora of any size: `th.py prepare` streams LM inputs (files, directories, globs, .gz, JSON Lines)
in bounded memory with today's Shakespeare output, and prepares translation corpora once into token memmaps that
runs read on every rank."""
import gzip
import hashlib
import json
import os
import pathlib
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest

from helpers import DATA, ROOT, SCRIPTS, multi30k_dir, th
from thcore.config import ConfigError
from thcore.data import corpus, lm
from thcore.data import translation as tdata
from thcore.data.subword import Subword
from thcore.data.translation import TokenPairs, read_lines
from thcore.engines.eager import EagerEngine
from thcore.loop import fit
from thcore.metrics import read_jsonl
from thcore.tasks.translation import TranslationTask

SHAKESPEARE = os.path.join(DATA, "tinyshakespeare", "input.txt")
GPT2_TOK = os.path.join(DATA, "gpt2-tokenizer")
M30K = os.path.join(DATA, "multi30k-en-de")
# sha256 of the files the one-shot prepare (before streaming) wrote for tiny Shakespeare
TODAY = {"char": ("6ec305602a99ac2802745a134e1f5e33e2231b4855525b00b9aebb730ac2626f",
                  "d37d30cc0c8327c270d493299c3dca54135f6d5f1c9ef60cda78076e311204b1"),
         "gpt2": ("502a2bdc8210d1ac5d5674867cb74467dd31db575d25cf6dbb08c8bdbea8680f",
                  "68a53422394c26a655ebe641f5c6f49888e8f4e45fe5d6f02abda63ba3ebd65b")}


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks, encode calls and pieces of a few KB: a small input crosses hundreds of seams."""
    monkeypatch.setattr(corpus, "BLOCK", 1000)
    monkeypatch.setattr(lm, "ENCODE_CHARS", 5000)
    monkeypatch.setattr(lm, "PIECE_CHARS", 700)


def sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def ids(out, split, dtype=np.uint16) -> list[int]:
    return np.fromfile(os.path.join(out, f"{split}.bin"), dtype=dtype).tolist()


# -- LM: today's output, through many seams ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["char", "gpt2"])
def test_shakespeare_byte_for_byte_as_before(kind, tmp_path, small_blocks):
    out = tmp_path / kind
    meta = lm.prepare(SHAKESPEARE, str(out), kind, GPT2_TOK if kind == "gpt2" else "")
    assert (sha(out / "train.bin"), sha(out / "val.bin")) == TODAY[kind]
    assert meta["dtype"] == "uint16" and "documents" not in meta
    assert not [p for p in os.listdir(out) if p.startswith(".")]   # the staging directory is gone


def test_gpt2_seams_keep_every_token(tmp_path, small_blocks):
    """Text built to trap a cut (runs of spaces before newlines, tabs, CJK, contractions, digits, no-break and
    ideographic spaces) encodes as the whole text encoded at once."""
    rng = random.Random(0)
    atoms = ["the", "The", "  ", "\n", "\n\n", " \n", "\t", "'s", "'ll", "123", "ü", "日本", "!!", "  \n\n",
             "\r\n", "é", "a", " ", "\u3000", "\xa0", "--", "x\n", "\n "]
    text = "".join(rng.choice(atoms) for _ in range(40_000))
    (tmp_path / "t.txt").write_text(text)
    lm.prepare(str(tmp_path / "t.txt"), str(tmp_path / "o"), "gpt2", GPT2_TOK)
    tok, n = lm.GPT2Tokenizer(GPT2_TOK), int(len(text) * 0.9)
    assert ids(tmp_path / "o", "train") == tok.encode(text[:n]) and ids(tmp_path / "o", "val") == tok.encode(text[n:])


# -- LM: many documents ------------------------------------------------------------------------------------------
def _docs(n=20):
    rng = random.Random(1)
    return [" ".join(rng.choice(["to", "be", "or", "not", "that", "is", "the", "question"]) for _ in range(30 + i))
            + "\n" for i in range(n)]


def _expected(docs, encode, eot, val_fraction=0.1):
    n_val = lm._val_documents(len(docs), val_fraction)
    parts = {"train": [], "val": []}
    for i, d in enumerate(docs):
        parts["val" if lm._is_val(i, len(docs), n_val) else "train"].append(encode(d))
    return {k: [t for j, doc in enumerate(v) for t in ([eot] if j else []) + doc] for k, v in parts.items()}, n_val


def test_directory_glob_gz_and_jsonl_are_documents_split_by_documents(tmp_path):
    docs = _docs()
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    for i, doc in enumerate(docs):   # plain, gzipped, in a subdirectory: sorted paths are the document order
        path = d / ("sub" if i >= 10 else "") / f"{i:02d}.txt"
        if i % 3 == 0:
            with gzip.open(str(path) + ".gz", "wt") as f:
                f.write(doc)
        else:
            path.write_text(doc)
    (d / ".hidden").write_text("never read")
    tok = lm.GPT2Tokenizer(GPT2_TOK)
    order = [doc for _, doc in sorted(
        (os.path.join(str(d), "sub" if i >= 10 else "", f"{i:02d}.txt" + (".gz" if i % 3 == 0 else "")), doc)
        for i, doc in enumerate(docs))]
    want, n_val = _expected(order, tok.encode, tok.eot)
    meta = lm.prepare(str(d), str(tmp_path / "dir"), "gpt2", GPT2_TOK)
    assert (meta["documents"], meta["val_documents"], n_val) == (20, 2, 2)
    assert ids(tmp_path / "dir", "train") == want["train"] and ids(tmp_path / "dir", "val") == want["val"]
    # JSON Lines (plain and gzipped) with the text in another field; a glob names the files
    records = [json.dumps({"id": i, "body": doc}) for i, doc in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("\n".join(records[:12]) + "\n\n")   # a blank line is no record
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(records[12:]))
    p = th("prepare", f"--input={tmp_path}/*.jsonl*", f"--out={tmp_path / 'j'}", "--tokenizer=char", "--text_field=body")
    assert "train" in p.stderr and p.stdout == ""
    meta = json.loads((tmp_path / "j" / "meta.json").read_text())
    chars = sorted(set("".join(docs)))
    assert meta["tokenizer"] == {"kind": "char", "chars": chars, "eot": len(chars)} and meta["vocab_size"] == len(chars) + 1
    tok = lm.load_tokenizer(str(tmp_path / "j"))
    want, _ = _expected(docs, tok.encode, tok.eot)
    assert ids(tmp_path / "j", "train") == want["train"] and ids(tmp_path / "j", "val") == want["val"]
    assert tok.decode(ids(tmp_path / "j", "val")) == "".join(d for i, d in enumerate(docs) if lm._is_val(i, 20, 2))


def test_uint32_when_the_vocabulary_passes_65536(tmp_path):
    cps = [c for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000]
    text = "".join(map(chr, cps)) * 2
    (tmp_path / "big.txt").write_text(text)
    meta = lm.prepare(str(tmp_path / "big.txt"), str(tmp_path / "o"), "char", val_fraction=0.5)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(cps)
    train = lm.open_split(str(tmp_path / "o"), "train")   # what LMTask reads
    assert train.dtype == np.uint32 and lm.load_tokenizer(str(tmp_path / "o")).decode(train) == "".join(map(chr, cps))


def test_bad_inputs_name_the_file_and_line_and_leave_the_old_output(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    p = th("prepare", f"--input={tmp_path / 'r.jsonl'}", f"--out={tmp_path / 'x'}", check=False)
    assert p.returncode == 2 and p.stderr.strip().endswith(
        f"error: input: {tmp_path / 'r.jsonl'}:2: no string field 'text' (name the text with --text_field)")
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(ConfigError, match=rf"input: {tmp_path / 's.jsonl'}:2: not a JSON object"):
        lm.prepare(str(tmp_path / "s.jsonl"), str(tmp_path / "x"))
    for arg, msg in (("--input=/nonexistent/*.txt", "error: input: /nonexistent/*.txt: no file matches"),
                     ("--task=speech", "error: task='speech': must be 'lm' or 'translation'")):
        p = th("prepare", arg, f"--out={tmp_path / 'x'}", check=False)
        assert p.returncode == 2 and p.stderr.strip().endswith(msg)
    # a prepare that fails half-way leaves the previous output whole and no partial files
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_text("first document\n" * 500)
    (d / "b.txt").write_text("second document\n")
    lm.prepare(str(d), str(tmp_path / "o"), "gpt2", GPT2_TOK)
    before = {f: sha(tmp_path / "o" / f) for f in os.listdir(tmp_path / "o")}
    (d / "b.txt").write_bytes(b"ok\n\xc3\x28 bad\n")
    with pytest.raises(ConfigError, match=rf"input: {d / 'b.txt'}: not valid UTF-8 at byte 3"):
        lm.prepare(str(d), str(tmp_path / "o"), "gpt2", GPT2_TOK)   # fails after a.txt's tokens were written
    assert {f: sha(tmp_path / "o" / f) for f in os.listdir(tmp_path / "o")} == before
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        lm.prepare(str(d), str(tmp_path / "new" / "o"), "gpt2", GPT2_TOK)
    assert not (tmp_path / "new").exists()   # nor the directories it made


def test_peak_memory_does_not_grow_with_the_input(tmp_path):
    """Char prepare of 8 MiB and of 64 MiB of Shakespeare, each in a fresh process: the same peak RSS (a one-shot
    prepare grows ~12x the input; the 2 GB figures are in docs/PERFORMANCE.md)."""
    text = open(SHAKESPEARE, "rb").read()
    peaks = []
    for mb in (8, 64):
        path = tmp_path / f"{mb}.txt"
        with open(path, "wb") as f:
            for _ in range((mb << 20) // len(text)):
                f.write(text)
        out = subprocess.run([sys.executable, os.path.join(SCRIPTS, "prepare_peak_rss.py"), ROOT, str(path),
                              str(tmp_path / f"o{mb}")], capture_output=True, text=True, timeout=600, check=True).stdout
        peaks.append(int(out.split()[-1]) / 1024)
        os.remove(path)
    assert peaks[1] < 1.2 * peaks[0], peaks


# -- translation -------------------------------------------------------------------------------------------------
def _m30k(tmp_path, train=1200, valid=40, test=30):
    return pathlib.Path(multi30k_dir(tmp_path, train, valid, test))


def _cfg(out, **kw):
    from helpers import TINY
    from thcore.config import from_dict
    from thcore.tasks.translation import TranslationConfig
    return from_dict(TranslationConfig, {**TINY, "name": "t", "out_dir": str(out), **kw})


def test_translation_prepare_encodes_as_the_in_memory_path(tmp_path):
    d = _m30k(tmp_path)
    th("prepare", "--task=translation", f"--data_dir={d}", f"--out={tmp_path / 'p'}", "--tokenizer=bpe",
       "--vocab_size=700", "--joint_vocab", "--progress=False")
    meta = tdata.read_meta(str(tmp_path / "p"))
    assert meta["splits"]["train"]["pairs"] == 1200 and meta["dtype"] == "uint16"
    tok = Subword.load(str(tmp_path / "p" / "vocab.joint.json"))
    src, tgt, _ = tdata.read_parallel(str(d / "train.en"), str(d / "train.de"), "train_src", "train_tgt")
    assert tok.tok.get_vocab() == Subword.train(src + tgt, "bpe", 700).tok.get_vocab()   # trained as before
    for split, truncate in (("train", False), ("valid", True)):
        s, t, _ = tdata.read_parallel(str(d / f"{split}.en"), str(d / f"{split}.de"), "a", "b")
        mapped = TokenPairs.open(str(tmp_path / "p"), split, 24, truncate)
        direct = TokenPairs.from_lines(s, t, tok, tok, 24, truncate)
        assert len(mapped) == len(direct) > 0 and mapped.dropped == direct.dropped
        assert (mapped.dropped > 0) != truncate   # max_len 24 drops some training pairs, truncates evaluation ones
        assert all(a.tolist() == b.tolist() for j in range(len(mapped)) for a, b in zip(mapped[j], direct[j]))
        assert mapped.sizes().tolist() == direct.sizes().tolist()
        shipped = pickle.dumps(mapped)   # what a DataLoader worker receives: the paths, not the corpus
        assert len(shipped) < 1000 and pickle.loads(shipped)[5][1].tolist() == mapped[5][1].tolist()
    assert tdata.read_refs(str(tmp_path / "p"), "valid") == read_lines(str(d / "valid.de"), "x")
    # a sample of the training pairs: every k-th pair
    every10 = tdata.train_tokenizers(str(d / "train.en"), str(d / "train.de"), "bpe", 500, False, 1, 120, 1200)[0]
    assert every10.tok.get_vocab() == Subword.train(src[::10], "bpe", 500).tok.get_vocab()


def test_prepared_run_has_the_losses_of_the_raw_run_and_resumes_reuse_it(tmp_path):
    d = _m30k(tmp_path)
    common = dict(tokenizer="bpe", vocab_size=700, joint_vocab=True, share_embeddings=True, max_tokens=400,
                  max_len=48, max_steps=50, log_every=1, eval_every=1000, dropout=0.1, precision="fp32",
                  engine="eager")
    th("prepare", "--task=translation", f"--data_dir={d}", f"--out={tmp_path / 'p'}", "--tokenizer=bpe",
       "--vocab_size=700", "--joint_vocab", "--progress=False")
    losses = []
    for name, kw in (("raw", dict(data_dir=str(d))), ("prep", dict(prepared=str(tmp_path / "p")))):
        cfg = _cfg(tmp_path / name, **common, **kw)
        task = TranslationTask(cfg, log=lambda *a: None)
        fit(cfg, task, EagerEngine(cfg))
        losses.append([r["loss"] for r in read_jsonl(os.path.join(cfg.run_dir, "metrics.jsonl")) if r["split"] == "train"])
    assert len(losses[0]) == 50 and losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0] - 0.5   # measured: 6.64 -> 5.75
    raw = _cfg(tmp_path / "raw", **common, data_dir=str(d))
    stamp = os.stat(os.path.join(raw.run_dir, "prepared", "meta.json")).st_mtime_ns
    TranslationTask(raw, log=lambda *a: None)   # a resume: the run's prepared corpus is reused, not rebuilt
    assert os.stat(os.path.join(raw.run_dir, "prepared", "meta.json")).st_mtime_ns == stamp
    with pytest.raises(ConfigError, match=rf"vocab_size=800: the prepared corpus {tmp_path / 'p'} was made with "
                                          r"vocab_size=700 \(set that, or prepare it again\)"):
        TranslationTask(_cfg(tmp_path / "x", **{**common, "vocab_size": 800}, prepared=str(tmp_path / "p")))
    with pytest.raises(ConfigError, match="prepared: .*meta.json: not found"):
        TranslationTask(_cfg(tmp_path / "x", **common, prepared=str(tmp_path)))


def test_translation_prepare_bad_input_is_one_line(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "train.en").write_text("a cat\nthe dog\n")
    (d / "train.de").write_text("eine katze\n")
    p = th("prepare", "--task=translation", f"--data_dir={d}", f"--out={tmp_path / 'p'}", check=False)
    assert p.returncode == 2 and p.stderr.strip() == (f"error: train_src/train_tgt: line counts differ: {d}/train.en "
                                                      f"has 2 lines, {d}/train.de has 1")
    p = th("prepare", "--task=translation", f"--out={tmp_path / 'p'}", check=False)
    assert p.returncode == 2 and p.stderr.strip().startswith("error: data_dir='': required with --task=translation")
    assert not (tmp_path / "p").exists()   # a failed prepare leaves no directory it made
