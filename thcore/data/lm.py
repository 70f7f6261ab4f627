"""Language-model data: prepare a corpus of any size into token memmaps, and draw random training windows from them.

A prepared directory (nanoGPT's layout, without the pickle):

    train.bin, val.bin   token ids as a flat uint16 array (uint32 for vocabularies over 65,536): the first 90%
                         of the characters / the last 10% of a single text, or documents split 90/10
    meta.json            vocab_size, token counts, and the tokenizer: {"kind": "char", "chars": [...]} or
                         {"kind": "gpt2", ...} with its vocab.json / merges.txt copied alongside

Batches are windows at random offsets, as in nanoGPT; the offsets of micro-batch `index` of `epoch` on `rank`
come from a generator seeded with (seed, epoch, index, rank) alone, so a resumed run draws the same windows.
"""
import json
import os
import shutil

import numpy as np
import torch

from ..config import ConfigError
from . import corpus

META = "meta.json"
GPT2_FILES = ("vocab.json", "merges.txt")
TRAIN, VAL = 0, 1   # stream tags: train and val windows never share a seed


# -- tokenizers ----------------------------------------------------------------------------------------------
class CharTokenizer:
    """One id per distinct character of the training text, in sorted order (nanoGPT's shakespeare_char); with
    `eot`, one more id after them separates documents (decoded as nothing)."""

    def __init__(self, chars: list[str], eot: bool = False):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.eot = len(self.chars) if eot else None
        self.vocab_size = len(self.chars) + bool(eot)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in this {self.vocab_size}-character vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids if int(i) != self.eot)

    def describe(self) -> dict:
        return {"kind": "char", "chars": self.chars, **({"eot": self.eot} if self.eot is not None else {})}

    @property
    def default_start(self) -> list[int]:
        """What an empty prompt starts from: a newline, as nanoGPT's sample.py."""
        return [self.stoi.get("\n", 0)]


class GPT2Tokenizer:
    """GPT-2's byte-level BPE from local vocab.json / merges.txt (the `tokenizers` library; no network)."""

    EOT = "<|endoftext|>"

    def __init__(self, directory: str):
        from tokenizers import ByteLevelBPETokenizer
        files = [os.path.join(directory, f) for f in GPT2_FILES]
        for f in files:
            if not os.path.isfile(f):
                raise ConfigError(f"tokenizer_dir: {f}: not found (a GPT-2 tokenizer needs vocab.json and merges.txt)")
        self.directory = directory
        self.tok = ByteLevelBPETokenizer(*files)   # add_prefix_space=False: GPT-2's own behaviour
        self.vocab_size = self.tok.get_vocab_size()
        self.eot = self.tok.token_to_id(self.EOT)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def describe(self) -> dict:
        return {"kind": "gpt2", "files": list(GPT2_FILES), "eot": self.tok.token_to_id(self.EOT)}

    @property
    def default_start(self) -> list[int]:
        return [self.tok.token_to_id(self.EOT)]


def load_tokenizer(directory: str, meta: dict | None = None):
    """The tokenizer a prepared (or run, or exported) directory describes in its meta.json; without one, a
    directory holding vocab.json + merges.txt is read as GPT-2's BPE."""
    if meta is None and os.path.isfile(os.path.join(directory, META)):
        meta = read_meta(directory)
    kind = (meta or {}).get("tokenizer", {}).get("kind", "gpt2")
    if kind == "char":
        return CharTokenizer(meta["tokenizer"]["chars"], eot="eot" in meta["tokenizer"])
    return GPT2Tokenizer(directory)


# -- prepare -------------------------------------------------------------------------------------------------
# Prepare streams: memory is bounded by the block size, whatever the input's size. A document is a plain-text
# file or a JSON Lines record; documents of a split are separated by the end-of-text token. One document (a
# single text file, e.g. tiny Shakespeare) is split as nanoGPT does: the first (1 - val_fraction) of its
# characters train, the rest val; several are split by documents, val taking an evenly spread val_fraction.
ENCODE_CHARS = 1 << 22   # characters per encode call
PIECE_CHARS = 1 << 12    # characters per piece of a call: pieces are encoded in parallel (long ones are slow)


def dtype_for(vocab_size: int) -> str:
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise ConfigError(f"vocab_size={vocab_size}: does not fit the uint32 token files")


def safe_cut(text: str, lo: int, hi: int) -> int:
    """The last position p in (lo, hi) where the text can be cut without changing GPT-2's tokens, or -1.

    GPT-2's pre-tokenizer splits the text into words by a regex without look-behind, and merges never cross
    words, so a cut where a word ends and the next one's match starts without context keeps every token: after a
    newline that follows a non-space and precedes a non-space (the newline is a word of its own there), or, in
    text without such newlines, before a space that sits between two letters (" word" is the next word)."""
    hi = min(hi, len(text) - 1)
    j = text.rfind("\n", lo + 1, hi)
    while j > lo:
        if not text[j - 1].isspace() and not text[j + 1].isspace():
            return j + 1
        j = text.rfind("\n", lo + 1, j)
    j = text.rfind(" ", lo + 1, hi)
    while j > lo:
        if text[j - 1].isalpha() and text[j + 1].isalpha():
            return j
        j = text.rfind(" ", lo + 1, j)
    return -1


_EMPTY = np.zeros(0, dtype=np.int64)


class _CharEncoder:
    """Characters to ids through a table indexed by code point (numpy: no Python loop per character)."""

    def __init__(self, tok: "CharTokenizer"):
        cps = np.array([ord(c) for c in tok.chars], dtype=np.int64)
        self.table = np.full(int(cps.max()) + 1 if len(cps) else 1, -1, dtype=np.int64)
        self.table[cps] = np.arange(len(cps))

    def feed(self, text: str) -> np.ndarray:
        return self.table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]

    def separator(self, eot: int) -> np.ndarray:
        return np.array([eot], dtype=np.int64)

    def end_document(self) -> np.ndarray:
        return _EMPTY

    flush = end_document


class _BPEEncoder:
    """The documents of one split, fed in blocks, are queued as pieces of ~PIECE_CHARS cut only where
    `safe_cut` allows (and at every document's end) and encoded ~ENCODE_CHARS at a time: one `encode_batch`
    call of many pieces, which `tokenizers` spreads over all cores, whether documents are long or short."""

    def __init__(self, tok: "GPT2Tokenizer"):
        self.encode = tok.tok.encode_batch
        self.pending, self.queue, self.queued = "", [], 0   # queue: text pieces and separator ids, in order

    def _cut(self, text: str):
        lo = 0
        while len(text) - lo > PIECE_CHARS:
            p = safe_cut(text, lo + PIECE_CHARS // 2, lo + PIECE_CHARS)
            if p < 0:
                p = safe_cut(text, lo, len(text))
                if p <= lo:
                    break
            self.queue.append(text[lo:p])
            lo = p
        self.queue.append(text[lo:])
        self.queued += len(text)

    def _drain(self, force: bool = False) -> np.ndarray:
        if not self.queue or not force and self.queued < ENCODE_CHARS:
            return _EMPTY
        encs = iter(self.encode([x for x in self.queue if isinstance(x, str)]))
        out = [np.array(next(encs).ids if isinstance(x, str) else [x], dtype=np.int64) for x in self.queue]
        self.queue, self.queued = [], 0
        return np.concatenate(out)

    def feed(self, text: str) -> np.ndarray:
        self.pending += text
        if len(self.pending) < ENCODE_CHARS:
            return _EMPTY
        p = safe_cut(self.pending, 0, len(self.pending))
        if p < 0:
            if len(self.pending) < 16 * ENCODE_CHARS:
                return _EMPTY
            p = len(self.pending)   # no cut in 64M characters: cut anyway (tokens at this one seam may differ)
        self._cut(self.pending[:p])
        self.pending = self.pending[p:]
        return self._drain()

    def separator(self, eot: int) -> np.ndarray:
        self.queue.append(eot)
        return _EMPTY

    def end_document(self) -> np.ndarray:
        if self.pending:
            self._cut(self.pending)
            self.pending = ""
        return self._drain()

    def flush(self) -> np.ndarray:
        return np.concatenate([self.end_document(), self._drain(force=True)])


def _documents(files: list[str], text_field: str, hasher=None, on_bytes=None):
    """Per document, an iterator over its text in blocks."""
    for path in files:
        reader = corpus.Reader(path, hasher, on_bytes)
        if corpus.is_jsonl(path):
            for text in corpus.jsonl_texts(reader, text_field):
                yield iter((text,))
        else:
            yield corpus.text_blocks(reader)


def _scan(files: list[str], text_field: str, want_chars: bool, show: bool):
    """(documents, characters of the first document, the set of characters or None): what the split and the
    char vocabulary need before encoding, in one streaming pass that skips what is not needed."""
    jsonl = [corpus.is_jsonl(f) for f in files]
    if not want_chars and not any(jsonl) and len(files) > 1:
        return len(files), 0, None   # one document per text file: nothing to read
    chars, n_docs, first = set(), 0, 0
    total = sum(os.path.getsize(f) for f in files)
    with corpus.progress(total, "scan", show) as bar:
        if not want_chars and all(jsonl):   # count the records without parsing them (pass 2 parses)
            for f in files:
                n_docs += sum(1 for b in corpus.Reader(f, on_bytes=bar.update).lines() if b.strip())
            return n_docs, 0, None
        for blocks in _documents(files, text_field, on_bytes=bar.update):
            for text in blocks:
                if n_docs == 0:
                    first += len(text)
                if want_chars:
                    chars.update(text)
            n_docs += 1
    return n_docs, first, (chars if want_chars else None)


def _val_documents(n_docs: int, val_fraction: float) -> int:
    return min(n_docs - 1, max(1, round(n_docs * val_fraction)))


def _is_val(i: int, n_docs: int, n_val: int) -> bool:
    """Document i is in val when the evenly spread count of val documents steps at i."""
    return (i + 1) * n_val // n_docs > i * n_val // n_docs


def prepare(input: str, out: str, tokenizer: str = "char", tokenizer_dir: str = "", val_fraction: float = 0.1,
            text_field: str = "text", show_progress: bool = False) -> dict:
    """Tokenize `input` (a text file, directory or glob; .gz and JSON Lines read too) into
    `out`/{train.bin, val.bin, meta.json}, streaming; returns the meta."""
    if tokenizer not in ("char", "gpt2"):
        raise ConfigError(f"tokenizer={tokenizer!r}: must be 'char' or 'gpt2'")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction!r}: must be in (0, 1)")
    files = corpus.expand(input)
    if tokenizer == "gpt2":
        if not tokenizer_dir:
            raise ConfigError("tokenizer_dir: required with tokenizer='gpt2' (a directory with vocab.json and merges.txt)")
        tok = GPT2Tokenizer(tokenizer_dir)
    n_docs, first_chars, chars = _scan(files, text_field, tokenizer == "char", show_progress)
    if n_docs == 0:
        raise ConfigError(f"input: {input}: no documents (every JSON Lines file is empty)")
    if tokenizer == "char":   # the whole input: val may hold a character train lacks
        tok = CharTokenizer(sorted(chars), eot=n_docs > 1)
    eot = tok.eot
    dtype = dtype_for(tok.vocab_size)
    n_val = _val_documents(n_docs, val_fraction) if n_docs > 1 else 0
    cut = int(first_chars * (1 - val_fraction)) if n_docs == 1 else -1   # as nanoGPT: split the text, then encode
    hasher = corpus.sha256()
    counts = {"train_tokens": 0, "val_tokens": 0}
    with corpus.Staging(out) as stage, corpus.progress(sum(os.path.getsize(f) for f in files), "prepare",
                                                       show_progress) as bar:
        outs = {s: open(stage.path(f"{s}.bin"), "wb") for s in ("train", "val")}
        used = {"train": False, "val": False}

        def write(split, ids):
            if len(ids):
                ids.astype(dtype).tofile(outs[split])
                counts[f"{split}_tokens"] += len(ids)
                bar.set_postfix_str(f"{counts['train_tokens'] + counts['val_tokens']:,} tokens", refresh=False)

        encoders = {k: _CharEncoder(tok) if tokenizer == "char" else _BPEEncoder(tok) for k in outs}
        for i, blocks in enumerate(_documents(files, text_field, hasher, bar.update)):
            split = "val" if n_val and _is_val(i, n_docs, n_val) else "train"
            if used[split] and eot is not None:
                write(split, encoders[split].separator(eot))
            used[split] = True
            seen = 0
            for text in blocks:
                if 0 <= cut < seen + len(text) and split == "train":   # the one-document split point
                    write(split, encoders[split].feed(text[:cut - seen]))
                    write(split, encoders[split].flush())
                    split, text, seen = "val", text[cut - seen:], cut
                write(split, encoders[split].feed(text))
                seen += len(text)
            write(split, encoders[split].end_document())
        for split, enc in encoders.items():
            write(split, enc.flush())
        for f in outs.values():
            f.close()
        if tokenizer == "gpt2":   # the prepared directory is self-contained: decoding needs no other path
            for f in GPT2_FILES:
                shutil.copyfile(os.path.join(tokenizer_dir, f), stage.path(f))
        meta = {"vocab_size": tok.vocab_size, "tokenizer": tok.describe(), "dtype": dtype, **counts,
                "source": os.path.abspath(input), "source_sha256": hasher.hexdigest(), "val_fraction": val_fraction}
        if n_docs > 1:
            meta.update(documents=n_docs, val_documents=n_val, files=len(files))
        stage.commit(meta)
    return meta


def read_meta(directory: str, field: str = "data_dir") -> dict:
    """`field`: the config field that named `directory`, for the error."""
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise ConfigError(f"{field}: {path}: not found; run `python th.py prepare --input=... --out={directory}` first")
    with open(path) as f:
        return json.load(f)


def copy_tokenizer(src_dir: str, dst_dir: str, meta: dict):
    """meta.json, and the BPE files when there are some: what decoding needs, next to a run or an export."""
    os.makedirs(dst_dir, exist_ok=True)
    with open(os.path.join(dst_dir, META), "w") as f:
        json.dump(meta, f, indent=1)
    if meta["tokenizer"]["kind"] == "gpt2":
        for f in GPT2_FILES:
            shutil.copyfile(os.path.join(src_dir, f), os.path.join(dst_dir, f))


# -- windows -------------------------------------------------------------------------------------------------
def open_split(directory: str, split: str) -> np.memmap:
    """A split's tokens, memory-mapped, in the dtype meta.json names (uint16 or uint32)."""
    path = os.path.join(directory, f"{split}.bin")
    if not os.path.isfile(path):
        raise ConfigError(f"data_dir: {path}: not found")
    return np.memmap(path, dtype=np.dtype(read_meta(directory).get("dtype", "uint16")), mode="r")


def seed_of(*parts: int) -> int:
    """A generator seed from a tuple of ints (ints hash the same in every process and every run)."""
    return hash(parts) & 0x7FFF_FFFF_FFFF_FFFF


class TokenMix:
    """Windows of `block_size + 1` tokens drawn from one or more token arrays with the given weights.

    Each row of a batch picks its source by weight, then a uniform offset in it: over many rows the sources
    appear in the configured proportions, whatever their sizes."""

    def __init__(self, arrays: list, weights: list[float], block_size: int):
        self.arrays, self.block_size = arrays, block_size
        w = torch.tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    def __len__(self) -> int:
        return sum(len(a) for a in self.arrays)

    def sample(self, batch_size: int, seed: int):
        """(idx [B, T], targets [B, T], source [B]) from a generator seeded with `seed`."""
        g = torch.Generator().manual_seed(seed)
        T = self.block_size
        if len(self.arrays) == 1:
            source = torch.zeros(batch_size, dtype=torch.long)
        else:
            source = torch.multinomial(self.weights, batch_size, replacement=True, generator=g)
        rows = []
        for s in source.tolist():
            a = self.arrays[s]
            i = int(torch.randint(len(a) - T, (1,), generator=g))
            rows.append(a[i:i + T + 1])
        xy = torch.from_numpy(np.stack(rows).astype(np.int64))
        return xy[:, :-1], xy[:, 1:], source

    def batch(self, batch_size: int, seed: int) -> dict:
        """A step batch: the model's input `idx` and the next-token `targets`."""
        x, y, _ = self.sample(batch_size, seed)
        return {"idx": x, "targets": y}
