"""Parallel corpora: line-aligned files (one sentence per line), prepared once into token memmaps, encoded
pairs read from them, padded batches."""
import itertools
import json
import os

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from ..config import ConfigError
from ..step import IGNORE
from . import corpus, lm
from .subword import Subword, Words
from .vocab import BOS, EOS, PAD, Vocab


class DataError(ConfigError):
    """Bad input data; the message names the field and file (and line where it applies)."""


def read_lines(path: str, field: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"{field}: file not found: {path}")
    with open(path, "rb") as f:
        return decode_lines(f.read(), path, field)


def decode_lines(data: bytes, where: str, field: str) -> list[str]:
    """UTF-8 lines of `data` (a final newline ends the last line); a bad line is named as where:line."""
    raw = data.split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()
    lines = []
    for i, b in enumerate(raw, 1):
        try:
            lines.append(b.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError:
            raise DataError(f"{field}: {where}:{i}: not valid UTF-8") from None
    return lines


def read_parallel(src_path: str, tgt_path: str, src_field: str, tgt_field: str):
    """(src lines, tgt lines, number of skipped empty pairs); errors name both files."""
    src, tgt = read_lines(src_path, src_field), read_lines(tgt_path, tgt_field)
    if len(src) != len(tgt):
        raise DataError(f"{src_field}/{tgt_field}: line counts differ: {src_path} has {len(src)} lines, "
                        f"{tgt_path} has {len(tgt)}")
    keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if s.strip() and t.strip()]
    if not keep:
        raise DataError(f"{src_field}: {src_path} (with {tgt_path}) has no non-empty sentence pairs")
    return [src[i] for i in keep], [tgt[i] for i in keep], len(src) - len(keep)


class TokenPairs(torch.utils.data.Dataset):
    """Encoded sentence pairs as four flat arrays (memory-mapped when prepared on disk): source and target ids
    concatenated, and their offsets (n + 1 each). Item j is (src ids + eos, tgt ids) as tensors. Training drops
    pairs longer than `max_len` tokens on either side (counted in `dropped`); `truncate=True` (evaluation:
    every sentence is scored) cuts them to `max_len` instead. `kept[j]` is item j's pair index in the split
    (its reference line for BLEU). Nothing here holds a Python object per sentence."""

    def __init__(self, src_ids, src_off, tgt_ids, tgt_off, max_len: int, truncate: bool = False):
        self.src_ids, self.src_off, self.tgt_ids, self.tgt_off = src_ids, src_off, tgt_ids, tgt_off
        self.max_len = max_len
        s_len, t_len = np.diff(src_off), np.diff(tgt_off)
        if truncate:
            self.kept = np.arange(len(s_len))
        else:
            self.kept = np.flatnonzero((s_len + 1 <= max_len) & (t_len + 1 <= max_len))   # +1: eos / bos
        self.dropped = len(s_len) - len(self.kept)
        cap = max_len - 1
        # the padded length each pair needs in a batch: source + eos, or bos + target (= target + eos)
        self._sizes = np.maximum(np.minimum(s_len, cap), np.minimum(t_len, cap))[self.kept] + 1

    @classmethod
    def from_lines(cls, src_lines, tgt_lines, src_tok, tgt_tok, max_len: int, truncate: bool = False):
        """Pairs encoded in memory (the demo task, or one split of a finished run)."""
        arrays = []
        for tok, lines in ((src_tok, src_lines), (tgt_tok, tgt_lines)):
            tok = Words(tok) if isinstance(tok, Vocab) else tok
            ids = tok.encode_batch(list(lines))
            arrays.append(np.fromiter((i for x in ids for i in x), dtype=np.int64))
            arrays.append(np.concatenate([[0], np.cumsum([len(x) for x in ids], dtype=np.int64)]))
        return cls(*arrays, max_len=max_len, truncate=truncate)

    @classmethod
    def open(cls, directory: str, split: str, max_len: int, truncate: bool = False, dtype: str = "uint16"):
        """A split of a directory made by `prepare`, memory-mapped."""
        arrays = []
        for side in ("src", "tgt"):
            arrays.append(_memmap(os.path.join(directory, f"{split}.{side}.bin"), dtype))
            arrays.append(_memmap(os.path.join(directory, f"{split}.{side}.idx"), "int64"))
        out = cls(*arrays, max_len=max_len, truncate=truncate)
        out._opened = (directory, split, max_len, truncate, dtype)
        return out

    def __getstate__(self):
        """A DataLoader worker re-maps the files rather than receiving a copy of the corpus."""
        opened = getattr(self, "_opened", None)
        return {"_opened": opened} if opened else self.__dict__

    def __setstate__(self, state):
        if set(state) == {"_opened"}:
            state = TokenPairs.open(*state["_opened"]).__dict__
        self.__dict__.update(state)

    def __len__(self):
        return len(self.kept)

    def __getitem__(self, j):
        i, cap = int(self.kept[j]), self.max_len - 1
        s = self.src_ids[self.src_off[i]:self.src_off[i + 1]][:cap]
        t = self.tgt_ids[self.tgt_off[i]:self.tgt_off[i + 1]][:cap]
        return (torch.from_numpy(np.append(s.astype(np.int64), EOS)), torch.from_numpy(t.astype(np.int64)))

    @property
    def pairs(self):
        """Every item, in order (read lazily)."""
        return _Items(self)

    def sizes(self) -> np.ndarray:
        return self._sizes


class _Items:
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, j):
        return self.data[j]

    def __iter__(self):
        return (self.data[j] for j in range(len(self.data)))


def _memmap(path: str, dtype: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"prepared: {path}: missing (prepare the data again)")
    if os.path.getsize(path) == 0:   # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def collate(pairs) -> dict:
    """src [B,S] padded with PAD; tgt_in = bos + y; targets = y + eos, padding ignored by the loss."""
    src = pad_sequence([s for s, _ in pairs], batch_first=True, padding_value=PAD)
    tgt_in = pad_sequence([torch.cat([torch.tensor([BOS]), t]) for _, t in pairs], batch_first=True,
                          padding_value=PAD)
    targets = pad_sequence([torch.cat([t, torch.tensor([EOS])]) for _, t in pairs], batch_first=True,
                           padding_value=IGNORE)
    return {"src": src, "tgt_in": tgt_in, "targets": targets}


# -- prepare: a corpus of any size, tokenized once into token memmaps ---------------------------------------------
# DIR/{split}.{src,tgt}.bin (ids, uint16 or uint32) and .idx (int64 offsets), {valid,test}.ref (the kept target
# lines, the BLEU references), the tokenizer files (vocab.joint.json, or vocab.src.json + vocab.tgt.json) and
# meta.json, written last (corpus.Staging): a run reads nothing from a directory without it.
PAIRS_PER_CALL = 20_000   # pairs encoded per encode_batch call (all cores); memory is bounded by it
SPLITS = ("train", "valid", "test")


def tokenizer_files(joint: bool) -> tuple[str, str]:
    return ("vocab.joint.json",) * 2 if joint else ("vocab.src.json", "vocab.tgt.json")


def count_lines(path: str, field: str) -> int:
    """Lines as read_lines counts them (a final newline ends the last line), without decoding."""
    if not os.path.isfile(path):
        raise DataError(f"{field}: file not found: {path}")
    n, last = 0, b"\n"
    for b in corpus.Reader(path).blocks():
        n, last = n + b.count(b"\n"), b[-1:]
    return n + (last != b"\n")


def _decoded(path: str, field: str):
    for i, b in enumerate(corpus.Reader(path).lines(), 1):
        try:
            yield b.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            raise DataError(f"{field}: {path}:{i}: not valid UTF-8") from None


def iter_pairs(src: str, tgt: str, src_field: str, tgt_field: str, every: int = 1):
    """(src, tgt) of every `every`-th line pair, empty pairs left out (as read_parallel), streaming."""
    for i, (s, t) in enumerate(zip(_decoded(src, src_field), _decoded(tgt, tgt_field))):
        if i % every == 0 and s.strip() and t.strip():
            yield s, t


def train_tokenizers(src: str, tgt: str, kind: str, vocab_size: int, joint: bool, min_freq: int,
                     sample: int, lines: int):
    """(source, target) tokenizers trained on the training pairs, or on `sample` of them evenly spread when the
    corpus is larger (0 = all). Each side streams from the files: no list of sentences is built."""
    every = max(1, -(-lines // sample)) if sample else 1

    def side(k):
        return (p[k] for p in iter_pairs(src, tgt, "train_src", "train_tgt", every))

    def build(text):
        if kind == "word":
            return Words(Vocab.build((line.split() for line in text), min_freq))
        return Subword.train(text, kind, vocab_size)

    if joint:
        joint_tok = build(itertools.chain(side(0), side(1)))
        return joint_tok, joint_tok
    return build(side(0)), build(side(1))


def _source_id(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def settings(kind: str, vocab_size: int, joint: bool, min_freq: int, sample: int) -> dict:
    """What a prepared directory was made with (a run checks its config against it)."""
    return {"tokenizer": kind, "vocab_size": vocab_size if kind != "word" else None, "joint_vocab": joint,
            "min_freq": min_freq if kind == "word" else None, "tokenizer_sample": sample}


def prepare(out: str, files: dict, kind: str = "word", vocab_size: int = 8000, joint: bool = False,
            min_freq: int = 1, sample: int = 1_000_000, tokenizers=None, show_progress: bool = False,
            log=lambda msg: None) -> dict:
    """Tokenize the line-aligned `files` {split: (src path, tgt path)} ("train" required) into `out`.
    `tokenizers`: (src, tgt) to encode with instead of training new ones (a resumed run keeps its ids)."""
    if "train" not in files:
        raise DataError("train_src: required (the tokenizer is trained on the training split)")
    counts = {}
    for split, (src, tgt) in files.items():
        a, b = count_lines(src, f"{split}_src"), count_lines(tgt, f"{split}_tgt")
        if a != b:
            raise DataError(f"{split}_src/{split}_tgt: line counts differ: {src} has {a} lines, {tgt} has {b}")
        counts[split] = a
    if tokenizers is None:
        log(f"prepare: training the {kind} tokenizer on {files['train'][0]}"
            + (f" ({sample:,} of {counts['train']:,} pairs)" if sample and counts["train"] > sample else ""))
        tokenizers = train_tokenizers(*files["train"], kind, vocab_size, joint, min_freq, sample, counts["train"])
    src_tok, tgt_tok = tokenizers
    dtype = lm.dtype_for(max(len(src_tok), len(tgt_tok)))
    meta = {"task": "translation", **settings(kind, vocab_size, joint, min_freq, sample), "dtype": dtype,
            "vocab": {"src": len(src_tok), "tgt": len(tgt_tok)}, "splits": {}}
    with corpus.Staging(out) as stage, corpus.progress(sum(counts.values()), "encode", show_progress, " pairs") as bar:
        for split, (src, tgt) in files.items():
            meta["splits"][split] = _encode_split(stage, split, src, tgt, src_tok, tgt_tok, dtype, counts[split], bar)
        for tok, name in zip(tokenizers, tokenizer_files(joint)):
            tok.save(stage.path(name))
        meta["sources"] = {split: [_source_id(src), _source_id(tgt)] for split, (src, tgt) in files.items()}
        stage.commit(meta)
    return meta


def _encode_split(stage, split, src, tgt, src_tok, tgt_tok, dtype, lines, bar) -> dict:
    outs = {name: open(stage.path(f"{split}.{name}"), "wb") for name in ("src.bin", "src.idx", "tgt.bin", "tgt.idx")}
    ref = open(stage.path(f"{split}.ref"), "wb") if split != "train" else None
    ends = {"src": 0, "tgt": 0}
    for side in ends:
        np.zeros(1, dtype=np.int64).tofile(outs[f"{side}.idx"])
    pairs = 0
    it = iter_pairs(src, tgt, f"{split}_src", f"{split}_tgt")
    while True:
        chunk = list(itertools.islice(it, PAIRS_PER_CALL))
        if not chunk:
            break
        pairs += len(chunk)
        bar.update(len(chunk))
        for k, (side, tok) in enumerate((("src", src_tok), ("tgt", tgt_tok))):
            lines_k = [p[k] for p in chunk]
            ids = tok.encode_batch(lines_k)
            lens = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
            np.fromiter((i for x in ids for i in x), dtype=dtype, count=int(lens.sum())).tofile(outs[f"{side}.bin"])
            (np.cumsum(lens) + ends[side]).tofile(outs[f"{side}.idx"])
            ends[side] += int(lens.sum())
            if side == "tgt" and ref is not None:
                ref.write("".join(line + "\n" for line in lines_k).encode("utf-8"))
    for f in list(outs.values()) + ([ref] if ref else []):
        f.close()
    if not pairs:
        raise DataError(f"{split}_src: {src} (with {tgt}) has no non-empty sentence pairs")
    return {"pairs": pairs, "skipped": lines - pairs, "src_tokens": ends["src"], "tgt_tokens": ends["tgt"]}


def up_to_date(directory: str, files: dict, want: dict) -> bool:
    """Whether `directory` holds these files' splits, prepared with these settings from their current contents
    (size and modification time)."""
    path = os.path.join(directory, corpus.Staging.META)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        meta = json.load(f)
    try:
        now = {split: [_source_id(src), _source_id(tgt)] for split, (src, tgt) in files.items()}
    except OSError:
        return False
    return meta.get("sources") == now and all(meta.get(k) == v for k, v in want.items())


def read_meta(directory: str, field: str = "prepared") -> dict:
    path = os.path.join(directory, corpus.Staging.META)
    if not os.path.isfile(path):
        raise DataError(f"{field}: {path}: not found; run `python th.py prepare --task=translation "
                        f"--out={directory} ...` first")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("task") != "translation":
        raise DataError(f"{field}: {directory}: not a prepared translation corpus (meta.json has no task: translation)")
    return meta


def read_refs(directory: str, split: str) -> list[str]:
    """The reference lines of an evaluation split (a few thousand: held in memory)."""
    return read_lines(os.path.join(directory, f"{split}.ref"), "prepared")
