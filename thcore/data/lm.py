"""Language-model data: prepare a text file into token memmaps, and draw random training windows from them.

A prepared directory (nanoGPT's layout, without the pickle):

    train.bin, val.bin   token ids as a flat uint16 array (first 90% of the characters / the last 10%)
    meta.json            vocab_size, token counts, and the tokenizer: {"kind": "char", "chars": [...]} or
                         {"kind": "gpt2", ...} with its vocab.json / merges.txt copied alongside

Batches are windows at random offsets, as in nanoGPT; the offsets of micro-batch `index` of `epoch` on `rank`
come from a generator seeded with (seed, epoch, index, rank) alone, so a resumed run draws the same windows.
"""
import hashlib
import json
import os
import shutil

import numpy as np
import torch

from ..config import ConfigError

META = "meta.json"
GPT2_FILES = ("vocab.json", "merges.txt")
TRAIN, VAL = 0, 1   # stream tags: train and val windows never share a seed


# -- tokenizers ----------------------------------------------------------------------------------------------
class CharTokenizer:
    """One id per distinct character of the training text, in sorted order (nanoGPT's shakespeare_char)."""

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError as e:
            raise ConfigError(f"character {e.args[0]!r} is not in this {self.vocab_size}-character vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def describe(self) -> dict:
        return {"kind": "char", "chars": self.chars}

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
        return CharTokenizer(meta["tokenizer"]["chars"])
    return GPT2Tokenizer(directory)


# -- prepare -------------------------------------------------------------------------------------------------
def _write_ids(ids, path: str, vocab_size: int):
    if vocab_size > 65536:
        raise ConfigError(f"vocab_size={vocab_size}: does not fit the uint16 token files")
    np.asarray(ids, dtype=np.uint16).tofile(path)


def prepare(input: str, out: str, tokenizer: str = "char", tokenizer_dir: str = "", val_fraction: float = 0.1) -> dict:
    """Tokenize text file `input` into `out`/{train.bin, val.bin, meta.json}; returns the meta."""
    if not os.path.isfile(input):
        raise ConfigError(f"input: file not found: {input}")
    if tokenizer not in ("char", "gpt2"):
        raise ConfigError(f"tokenizer={tokenizer!r}: must be 'char' or 'gpt2'")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction!r}: must be in (0, 1)")
    raw = open(input, "rb").read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"input: {input}: not valid UTF-8 at byte {e.start}") from None
    n = int(len(text) * (1 - val_fraction))
    parts = {"train": text[:n], "val": text[n:]}   # split the text, then encode: as nanoGPT
    if tokenizer == "char":
        tok = CharTokenizer(sorted(set(text)))   # the whole text: val may hold a character train lacks
    else:
        if not tokenizer_dir:
            raise ConfigError("tokenizer_dir: required with tokenizer='gpt2' (a directory with vocab.json and merges.txt)")
        tok = GPT2Tokenizer(tokenizer_dir)
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split, part in parts.items():
        ids = tok.encode(part)
        counts[f"{split}_tokens"] = len(ids)
        _write_ids(ids, os.path.join(out, f"{split}.bin"), tok.vocab_size)
    if tokenizer == "gpt2":   # the prepared directory is self-contained: decoding needs no other path
        for f in GPT2_FILES:
            if os.path.abspath(os.path.join(tokenizer_dir, f)) != os.path.abspath(os.path.join(out, f)):
                shutil.copyfile(os.path.join(tokenizer_dir, f), os.path.join(out, f))
    meta = {"vocab_size": tok.vocab_size, "tokenizer": tok.describe(), "dtype": "uint16", **counts,
            "source": os.path.abspath(input), "source_sha256": hashlib.sha256(raw).hexdigest(),
            "val_fraction": val_fraction}
    with open(os.path.join(out, META), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        raise ConfigError(f"data_dir: {path}: not found; run `python th.py prepare --input=... --out={directory}` first")
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
    path = os.path.join(directory, f"{split}.bin")
    if not os.path.isfile(path):
        raise ConfigError(f"data_dir: {path}: not found")
    return np.memmap(path, dtype=np.uint16, mode="r")


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
