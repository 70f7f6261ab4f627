"""Subword tokenizers (BPE or unigram, from the `tokenizers` library) trained on the training split.

The pre-tokenizer is Metaspace (spaces become "▁" and stay inside the pieces, as SentencePiece does) followed by
isolating punctuation: nothing depends on whitespace between words, so text in any script, Chinese without
spaces included, is segmented, and decoding gives back the original spacing. The specials are those of the
word vocabulary (pad=0, bos=1, eos=2, unk=3), so both kinds of vocabulary plug into the same model and batches.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..config import ConfigError
from .vocab import SPECIALS, UNK, content_ids


class Subword:
    """`encode(line) -> ids` and `decode(ids) -> line` over one `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer):
        if [tok.id_to_token(i) for i in range(len(SPECIALS))] != SPECIALS:
            raise ConfigError(f"tokenizer: ids 0-3 must be {SPECIALS}")
        self.tok = tok

    @classmethod
    def train(cls, lines, kind: str = "bpe", vocab_size: int = 8000) -> "Subword":
        if kind == "bpe":
            tok = Tokenizer(models.BPE(unk_token=SPECIALS[UNK]))
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False)
        elif kind == "unigram":
            tok = Tokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                              unk_token=SPECIALS[UNK], show_progress=False)
        else:
            raise ConfigError(f"tokenizer={kind!r}: must be one of 'word', 'bpe', 'unigram'")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(),
                                                     pre_tokenizers.Punctuation("isolated")])
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(lines, trainer)
        return cls(tok)

    def __len__(self):
        return self.tok.get_vocab_size()

    def encode(self, line: str) -> list[int]:
        return self.tok.encode(line, add_special_tokens=False).ids

    def encode_batch(self, lines: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(lines, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of `ids` up to the first eos, without pad/bos."""
        return self.tok.decode(content_ids(ids), skip_special_tokens=False)

    def save(self, path: str):
        self.tok.save(path)

    @classmethod
    def load(cls, path: str) -> "Subword":
        return cls(Tokenizer.from_file(path))


class Words:
    """The word vocabulary (whitespace-split, min_freq) behind the same interface as `Subword`."""

    def __init__(self, vocab):
        self.vocab = vocab

    def __len__(self):
        return len(self.vocab)

    def encode(self, line: str) -> list[int]:
        return self.vocab.encode(line.split())

    def encode_batch(self, lines: list[str]) -> list[list[int]]:
        return [self.encode(line) for line in lines]

    def decode(self, ids) -> str:
        return " ".join(self.vocab.decode(ids))

    def save(self, path: str):
        self.vocab.save(path)
