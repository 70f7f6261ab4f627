"""The README's demo, exactly as a user runs it: it must reach its bar (held-out exact match >= 0.90)."""
import os

from helpers import th
from thcore.metrics import read_jsonl


def test_demo_reaches_its_bar(tmp_path):
    out = tmp_path / "demo"
    p = th("run", "recipes/single_translation.py", f"--out_dir={out}", timeout=1200)
    assert "parameters" in p.stdout and "vocab src" in p.stdout and "global batch" in p.stdout
    # eval lines, and (output to a pipe, not a terminal) one plain line per log step instead of a progress bar
    assert "eval val step 1000" in p.stdout and "step 1000/1000 | loss" in p.stdout and "tok/s" in p.stdout
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    final = [r for r in rows if r["split"] == "val"][-1]
    test = [r for r in rows if r["split"] == "test"][-1]
    assert final["step"] == 1000 and final["exact_match"] >= 0.90, final
    assert test["exact_match"] >= 0.90, test
