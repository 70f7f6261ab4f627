"""BLEU that is right for the target language: the sacrebleu tokenizer per target language (zh, ja, the 13a
default, an override), and a task on a Chinese target scoring with zh. The command line and multi-rank scores
are tests/integration/test_scores_cli.py."""
import pytest
import sacrebleu

from thcore.config import ConfigError
from thcore.scores import bleu_tokenizer, corpus_scores

ZH_HYP = ["我们今天去北京看天安门。", "他喜欢在公园里跑步。"]
ZH_REF = ["我们今天去北京参观天安门。", "他喜欢在公园里跑步。"]


def test_chinese_target_is_scored_with_the_zh_tokenizer():
    assert bleu_tokenizer("auto", "zh") == ("zh", "") and bleu_tokenizer("auto", "zh-CN")[0] == "zh"
    scores = corpus_scores(ZH_HYP, ZH_REF, bleu_tokenizer("auto", "zh")[0])
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="zh").score)
    assert "tok:zh" in scores["bleu_signature"]
    # what 13a would have said: a whole Chinese sentence is one "word"
    assert scores["bleu"] > 50 > sacrebleu.corpus_bleu(ZH_HYP, [ZH_REF], tokenize="13a").score


def test_tokenizer_choice_per_language_and_override():
    assert bleu_tokenizer("auto", "de") == ("13a", "")
    assert bleu_tokenizer("char", "zh") == ("char", "")
    tok, warning = bleu_tokenizer("auto", "ja")
    try:
        import MeCab  # noqa: F401
        assert tok == "ja-mecab" and warning == ""
    except ImportError:
        assert tok == "char" and warning.startswith("warning: ") and "sacrebleu[ja]" in warning
        with pytest.raises(ConfigError, match=r"bleu_tokenize='ja-mecab': needs `pip install sacrebleu\[ja\]`"):
            bleu_tokenizer("ja-mecab", "ja")


def test_task_on_a_chinese_target_uses_zh(tmp_path):
    from helpers import tiny_config
    from thcore.tasks.translation import TranslationTask
    d = tmp_path / "zh"
    d.mkdir()
    for split in ("train", "valid", "test"):
        (d / f"{split}.en").write_text("We go to Beijing today.\nHe likes running in the park.\n" * 8)
        (d / f"{split}.zh").write_text("".join(line + "\n" for line in ZH_REF) * 8)
    task = TranslationTask(tiny_config(tmp_path, data_dir=str(d), src_lang="en", tgt_lang="zh"))
    assert task.bleu_tokenize == "zh" and "tok:zh" in task.signatures["bleu_signature"]
    assert "BLEU tokenize zh" in task.summary
