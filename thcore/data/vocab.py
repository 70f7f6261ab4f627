"""A word vocabulary with the special tokens every model here uses (pad=0, bos=1, eos=2, unk=3)."""
import collections
import json

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


class Vocab:
    def __init__(self, itos: list[str]):
        if itos[:4] != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, sentences, min_freq: int = 1, max_size: int | None = None) -> "Vocab":
        """Words seen at least `min_freq` times, most frequent first (ties alphabetical: deterministic)."""
        counts = collections.Counter(w for s in sentences for w in s)
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(SPECIALS + words[:max_size])

    def __len__(self):
        return len(self.itos)

    def encode(self, words) -> list[int]:
        return [self.stoi.get(w, UNK) for w in words]

    def decode(self, ids) -> list[str]:
        """Words up to the first eos, without pad/bos."""
        return [self.itos[i] for i in content_ids(ids)]

    def save(self, path: str):
        with open(path, "w") as f:
            json.dump({"itos": self.itos}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str) -> "Vocab":
        with open(path) as f:
            return cls(json.load(f)["itos"])


def content_ids(ids) -> list[int]:
    """Token ids up to (not including) the first eos, without pad/bos: what a decoded sequence says."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS:
            break
        if i not in (PAD, BOS):
            out.append(i)
    return out
