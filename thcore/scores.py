"""Corpus BLEU and chrF of detokenized translations, through sacrebleu's public API, with the BLEU tokenizer
that fits the target language (13a splits on spaces and punctuation: a Chinese sentence would be one word); the
LM task's perplexity."""
import math

from sacrebleu.metrics import BLEU, CHRF

from .config import ConfigError

BLEU_TOKENIZERS = ("auto", *BLEU.TOKENIZERS)
_BY_LANGUAGE = {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"}
_EXTRA = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]", "spm": "sentencepiece",
          "flores101": "sentencepiece", "flores200": "sentencepiece", "spBLEU-1K": "sentencepiece"}


def _available(tokenize: str) -> bool:
    try:
        BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError):   # sacrebleu's way of saying an optional package is missing
        return False
    return True


def bleu_tokenizer(setting: str, tgt_lang: str) -> tuple[str, str]:
    """(sacrebleu tokenizer, warning or ''): `setting`, or for 'auto' the one of the target language code
    (e.g. 'zh', 'zh-CN'), falling back to 'char' with a warning when its optional package is missing."""
    if setting != "auto":
        if not _available(setting):
            raise ConfigError(f"bleu_tokenize={setting!r}: needs `pip install {_EXTRA.get(setting, 'sacrebleu')}`")
        return setting, ""
    language = tgt_lang.lower().replace("_", "-").split("-")[0]
    tokenize = _BY_LANGUAGE.get(language, "13a")
    if not _available(tokenize):
        return "char", (f"warning: BLEU on {tgt_lang!r} wants sacrebleu's {tokenize!r} tokenizer, which needs "
                        f"`pip install {_EXTRA[tokenize]}`; scoring with 'char' instead (bleu_tokenize= to choose)")
    return tokenize, ""


def corpus_scores(hyps: list[str], refs: list[str], tokenize: str = "13a") -> dict:
    """{"bleu", "chrf", "bleu_signature", "chrf_signature"}: what the `sacrebleu` command line prints for the
    same lines with `--tokenize TOKENIZE` (chrF has no tokenizer)."""
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def signatures(tokenize: str) -> dict:
    """The sacrebleu signatures of these settings with one reference (what `corpus_scores` reports)."""
    out = corpus_scores(["a"], ["a"], tokenize)
    return {"tokenize": tokenize, "bleu_signature": out["bleu_signature"], "chrf_signature": out["chrf_signature"]}


def perplexity(loss: float) -> float:
    """exp(mean token loss), capped where exp would overflow a float (a diverged run's loss)."""
    return math.exp(min(loss, 50.0))
