"""The built-in demo task: translating an English-like language into a German-like one.

Not a copy task. The target language has its own (generated) words and
  - reorders: subject-verb-object becomes subject-object-[adverb]-verb; adjectives follow their noun;
  - agrees: a plural noun takes the plural marker `-en`; the verb agrees with its subject (`-t` / `-en`);
  - says numbers the German way round: "thirty four" becomes "vier und dreissig".
The lexicon is fixed; sentences are sampled from a seeded generator, so train/valid/test never depend on files.
"""
import random

NOUNS = "cat dog bird horse fox wolf bear mouse lion goat duck frog fish snake tiger whale owl crow deer pig sheep hen bee ant".split()
ADJS = "big small red blue old young fast slow happy sad green brown loud quiet wild tame".split()
VERBS = "chase see help follow feed watch hear greet find call push pull carry teach meet love".split()
ADVS = "quickly slowly often rarely today again quietly gladly never always".split()
UNITS = "one two three four five six seven eight nine".split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()

T_UNITS = "ein zwei drei vier fuenf sechs sieben acht neun".split()
T_TENS = "zwanzig dreissig vierzig fuenfzig sechzig siebzig achtzig neunzig".split()


def _target_lexicon():
    """Invented target words (two syllables each), fixed by a private seed."""
    rng = random.Random(1234)
    cons, vows = "bdfgklmnprstvz", "aeiou"
    words, seen = {}, set()
    for w in NOUNS + ADJS + VERBS + ADVS:
        while True:
            t = "".join(rng.choice(cons) + rng.choice(vows) for _ in range(2)) + rng.choice(cons)
            if t not in seen:
                seen.add(t)
                words[w] = t
                break
    return words


LEX = _target_lexicon()


def _number(rng):
    """(source words, target words, value) for 1-9 or 20-99."""
    if rng.random() < 0.5:
        u = rng.randrange(9)
        return [UNITS[u]], [T_UNITS[u]], u + 1
    t, u = rng.randrange(8), rng.randrange(10)
    if u == 0:
        return [TENS[t]], [T_TENS[t]], 20 + 10 * t
    return [TENS[t], UNITS[u - 1]], [T_UNITS[u - 1], "und", T_TENS[t]], 20 + 10 * t + u


def _noun_phrase(rng):
    num_s, num_t, n = _number(rng)
    adjs = rng.sample(ADJS, rng.randrange(3))
    noun = rng.choice(NOUNS)
    src = num_s + adjs + [noun + ("s" if n > 1 else "")]
    tgt = num_t + [LEX[noun]] + (["-en"] if n > 1 else []) + [LEX[a] for a in adjs]
    return src, tgt, n > 1


def sentence(rng) -> tuple[str, str]:
    subj_s, subj_t, plural = _noun_phrase(rng)
    obj_s, obj_t, _ = _noun_phrase(rng)
    verb = rng.choice(VERBS)
    adv = [rng.choice(ADVS)] if rng.random() < 0.5 else []
    src = subj_s + [verb if plural else verb + "s"] + obj_s + adv
    tgt = subj_t + obj_t + [LEX[a] for a in adv] + [LEX[verb], "-en" if plural else "-t"]
    return " ".join(src), " ".join(tgt)


def corpus(n: int, seed: int, exclude: set | None = None) -> tuple[list[str], list[str]]:
    """`n` distinct sentence pairs, none of whose source side is in `exclude` (keeps splits disjoint)."""
    rng, seen = random.Random(seed), set(exclude or ())
    src, tgt = [], []
    while len(src) < n:
        s, t = sentence(rng)
        if s not in seen:
            seen.add(s)
            src.append(s)
            tgt.append(t)
    return src, tgt


def splits(train: int, valid: int, test: int, seed: int = 0) -> dict:
    """{'train': (src, tgt), 'valid': ..., 'test': ...}, pairwise disjoint."""
    out, used = {}, set()
    for i, (name, n) in enumerate((("valid", valid), ("test", test), ("train", train))):
        out[name] = corpus(n, seed * 1000 + i, exclude=used)
        used.update(out[name][0])
    return out
