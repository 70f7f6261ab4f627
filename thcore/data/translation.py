"""Parallel corpora: line-aligned files (one sentence per line), encoded pairs, padded batches."""
import os

import torch
from torch.nn.utils.rnn import pad_sequence

from ..config import ConfigError
from ..step import IGNORE
from .subword import Words
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


class PairDataset(torch.utils.data.Dataset):
    """Encoded (src ids + eos, tgt ids) pairs. `src_tok`/`tgt_tok` have `encode_batch(lines)` (a Subword or
    Words; a plain Vocab is taken as whitespace-split words). Training drops pairs longer than `max_len`
    tokens on either side (counted in `dropped`); `truncate=True` (evaluation: every sentence is scored) cuts
    them to `max_len` instead."""

    def __init__(self, src_lines, tgt_lines, src_tok, tgt_tok, max_len: int, truncate: bool = False):
        src_tok, tgt_tok = (Words(t) if isinstance(t, Vocab) else t for t in (src_tok, tgt_tok))
        self.pairs, self.kept, self.dropped = [], [], 0
        for n, (s, t) in enumerate(zip(src_tok.encode_batch(list(src_lines)), tgt_tok.encode_batch(list(tgt_lines)))):
            if len(s) + 1 > max_len or len(t) + 1 > max_len:   # +1: eos / bos
                if not truncate:
                    self.dropped += 1
                    continue
                s, t = s[:max_len - 1], t[:max_len - 1]
            self.kept.append(n)   # line index in the split: its reference text for BLEU
            self.pairs.append((torch.tensor(s + [EOS]), torch.tensor(t, dtype=torch.long)))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]

    def sizes(self) -> list[int]:
        """Padded length each pair needs in a batch: source + eos, or bos + target (= target + eos)."""
        return [max(len(s), len(t) + 1) for s, t in self.pairs]


def collate(pairs) -> dict:
    """src [B,S] padded with PAD; tgt_in = bos + y; targets = y + eos, padding ignored by the loss."""
    src = pad_sequence([s for s, _ in pairs], batch_first=True, padding_value=PAD)
    tgt_in = pad_sequence([torch.cat([torch.tensor([BOS]), t]) for _, t in pairs], batch_first=True,
                          padding_value=PAD)
    targets = pad_sequence([torch.cat([t, torch.tensor([EOS])]) for _, t in pairs], batch_first=True,
                           padding_value=IGNORE)
    return {"src": src, "tgt_in": tgt_in, "targets": targets}
