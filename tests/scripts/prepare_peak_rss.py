"""Char-level `lm.prepare` of one input in this fresh process, then this process's peak resident set in KiB
(tests/integration/test_prepare.py runs it once per input size).

    python tests/scripts/prepare_peak_rss.py REPO_ROOT INPUT OUT_DIR
"""
import resource
import sys

root, inp, out = sys.argv[1:4]
sys.path.insert(0, root)
from thcore.data import lm  # noqa: E402

lm.prepare(inp, out, "char")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
