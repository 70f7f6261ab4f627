"""BLEU that is right for the target language, the same on any number of ranks, and the same as the sacrebleu
command line on the output of `th.py translate`."""
import json
import os
import subprocess
import sys

import pytest
import sacrebleu

from helpers import ROOT, SCRIPTS, TINY, free_port, th
from thcore.config import ConfigError
from thcore.data import demo
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


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny translation run on the demo task written out as files, trained long enough that its
    translations score well above zero."""
    tmp = tmp_path_factory.mktemp("bleu")
    data = tmp / "data"
    data.mkdir()
    for split, (src, tgt) in demo.splits(1500, 64, 96, seed=0).items():
        (data / f"{split}.en").write_text("".join(line + "\n" for line in src))
        (data / f"{split}.de").write_text("".join(line + "\n" for line in tgt))
    run = tmp / "run"
    args = {**TINY, "d_model": 64, "d_ff": 128, "max_steps": 300, "eval_every": 0, "log_every": 50}
    th("run", "recipes/single_translation.py", f"--data_dir={data}", f"--out_dir={run}",
       *(f"--{k}={v}" for k, v in args.items() if not k.startswith("demo_")), timeout=900)
    return run, data


def test_eval_equals_the_sacrebleu_command_line_on_translate_output(trained_run, tmp_path):
    run, data = trained_run
    res = json.loads(th("eval", run, "--split=test", "--beam=2", "--device=cpu").stdout)
    out = tmp_path / "hyp.de"
    out.write_text(th("translate", run, f"--input={data / 'test.en'}", "--beam=2", "--device=cpu").stdout)
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(data / "test.de"), "-i", str(out), "-m", "bleu",
                          "chrf", "-tok", "13a", "-w", "4", "-f", "json"], capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(cli.stdout)
    assert res["bleu"] > 5   # a model that learned something: the comparison is not between two zeros
    assert res["bleu"] == pytest.approx(bleu["score"], abs=1e-4) and res["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
    assert res["bleu_signature"] == bleu["signature"]
    assert json.load(open(run / "sacrebleu.json"))["bleu_signature"] == bleu["signature"]


def test_two_processes_score_exactly_as_one(trained_run):
    run, _ = trained_run
    one = json.loads(th("eval", run, "--split=test", "--device=cpu").stdout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                        os.path.join(SCRIPTS, "dist_eval.py"), str(run)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    two = json.loads(p.stdout.strip().splitlines()[-1])
    assert one["bleu"] > 5
    for k in ("bleu", "chrf", "loss", "exact_match"):
        assert two[k] == pytest.approx(one[k], abs=1e-4), k
