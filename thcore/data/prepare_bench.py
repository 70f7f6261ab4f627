"""Bench of `th.py prepare`: peak memory against input size, and speed against the one-shot reference.

    python -m thcore.data.prepare_bench [--sizes_mb=200,2000 --speed_mb=50 --tokenizers=char,gpt2
                                         --workdir=/tmp/prepare_bench --repeats=2 --json
                                         --translation_pairs=29000,2000000 --tokenizer_sample=200000]

The inputs are tiny Shakespeare repeated to each size, written under --workdir (never into the repository).
Memory: each prepare runs in a child process and its peak RSS is that child's ru_maxrss (os.wait4). Speed: on
the --speed_mb input, in the same run and alternating, prepare (GPT-2, everything from the file to train.bin /
val.bin, scan pass included) against what a user would write with `tokenizers`: the file read into memory, its
lines given to one `encode_batch` call (all cores), the ids gathered into one numpy array; best of --repeats
each. Translation: synthetic corpora prepared, then a 2-process run from each: the ranks' peak RSS does not
depend on the corpus size when no rank holds the corpus in Python objects. Results: docs/PERFORMANCE.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(os.path.dirname(ROOT), "shared", "data", "tinyshakespeare", "input.txt")
GPT2_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "gpt2-tokenizer")

_PREPARE = """
import json, sys, time
sys.path.insert(0, {root!r})
from thcore.data import lm
t = time.perf_counter()
meta = lm.prepare({input!r}, {out!r}, {tokenizer!r}, {tokenizer_dir!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "tokens": meta["train_tokens"] + meta["val_tokens"]}}))
"""

_REFERENCE = """
import json, time
import numpy as np
from tokenizers import ByteLevelBPETokenizer
tok = ByteLevelBPETokenizer({vocab!r}, {merges!r})
text = open({input!r}, encoding="utf-8").read()
t = time.perf_counter()
encs = tok.encode_batch(text.splitlines(keepends=True))
ids = np.fromiter((i for e in encs for i in e.ids), dtype=np.uint16)
print(json.dumps({{"seconds": time.perf_counter() - t, "tokens": len(ids)}}))
"""


def make_input(workdir: str, mb: int, source: str = SHAKESPEARE) -> str:
    """`source` repeated to `mb` MiB (whole copies and a cut at the end of a line)."""
    path = os.path.join(workdir, f"shakespeare_{mb}mb.txt")
    want = mb << 20
    if os.path.isfile(path) and os.path.getsize(path) == want:
        return path
    text = open(source, "rb").read()
    with open(path + ".tmp", "wb") as f:
        left = want
        while left > 0:
            chunk = text[:left]
            f.write(chunk)
            left -= len(chunk)
    os.replace(path + ".tmp", path)
    return path


def child(code: str) -> dict:
    """Run `code` in a fresh interpreter: its JSON line, with its peak RSS (MiB) and wall time."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    out, err = p.stdout.read(), p.stderr.read()
    p.stdout.close()
    p.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: child failed:\n{err}")
    res = json.loads(out.strip().splitlines()[-1])
    return {**res, "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t}


def prepare_child(path: str, out: str, tokenizer: str) -> dict:
    return child(_PREPARE.format(root=ROOT, input=path, out=out, tokenizer=tokenizer,
                                 tokenizer_dir=GPT2_DIR if tokenizer == "gpt2" else ""))


M30K = os.path.join(os.path.dirname(ROOT), "shared", "data", "multi30k-en-de")


def make_pairs(workdir: str, n: int) -> str:
    """A synthetic parallel corpus of `n` training pairs (Multi30k's repeated), Multi30k's first 50 valid / test."""
    d = os.path.join(workdir, f"pairs_{n}")
    if os.path.isfile(os.path.join(d, "test.de")):
        return d
    os.makedirs(d, exist_ok=True)
    for lang in ("en", "de"):
        lines = open(os.path.join(M30K, f"train.{lang}"), "rb").read().splitlines(keepends=True)
        with open(os.path.join(d, f"train.{lang}"), "wb") as f:
            for i in range(n):
                f.write(lines[i % len(lines)])
        for split in ("valid", "test"):
            head = open(os.path.join(M30K, f"{split}.{lang}"), "rb").read().splitlines(keepends=True)[:50]
            with open(os.path.join(d, f"{split}.{lang}"), "wb") as f:
                f.write(b"".join(head))
    return d


def command(args: list[str]) -> dict:
    """Run `python th.py ARGS`: its peak RSS (the largest process of its tree: with torchrun, the largest rank)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "th.py"), *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: th.py {' '.join(args)} failed:\n{err[-3000:]}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - t}


def translation_rows(workdir: str, sizes: list[int], sample: int, say) -> list[dict]:
    """Per corpus size: `th.py prepare --task=translation`, then a 2-process DDP run from --prepared (a few steps
    of a small model): peak RSS of each."""
    rows = []
    for n in sizes:
        d, out = make_pairs(workdir, n), os.path.join(workdir, f"prepared_{n}")
        prep = command(["prepare", "--task=translation", f"--data_dir={d}", f"--out={out}", "--tokenizer=bpe",
                        "--joint_vocab", "--vocab_size=8000", f"--tokenizer_sample={sample}", "--progress=False"])
        run = command(["run", "recipes/multi30k_en_de.py", f"--prepared={out}", f"--out_dir={workdir}/run_{n}",
                       "--resume=never", "--engine=ddp", "--nproc=2", "--max_steps=5", "--max_minutes=0",
                       "--eval_every=100000", "--log_every=5", "--test_beam=1", "--d_model=64", "--num_heads=2",
                       "--num_encoder_layers=1", "--num_decoder_layers=1", "--d_ff=128"])
        rows.append({"pairs": n, "prepare_peak_rss_mib": prep["peak_rss_mib"], "prepare_s": prep["wall_s"],
                     "run_rank_peak_rss_mib": run["peak_rss_mib"], "run_s": run["wall_s"]})
        say(f"translation {n:9,d} pairs: prepare peak RSS {prep['peak_rss_mib']:6.0f} MiB in {prep['wall_s']:6.1f} s | "
            f"2-process run from --prepared: largest rank peak RSS {run['peak_rss_mib']:6.0f} MiB")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes_mb", default="200,2000", help="input sizes (MiB) of the memory rows")
    ap.add_argument("--speed_mb", type=int, default=50, help="input size (MiB) of the speed comparison; 0 = none")
    ap.add_argument("--tokenizers", default="char,gpt2")
    ap.add_argument("--workdir", default="/tmp/prepare_bench")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--translation_pairs", default="", help="e.g. 29000,2000000: synthetic parallel corpora to "
                                                          "prepare and train from (2 processes)")
    ap.add_argument("--tokenizer_sample", type=int, default=200_000)
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    rows, speed = [], {}
    say = (lambda *x: print(*x, file=sys.stderr)) if a.json else print
    if a.speed_mb:
        path = make_input(a.workdir, a.speed_mb)
        ref = _REFERENCE.format(vocab=os.path.join(GPT2_DIR, "vocab.json"), merges=os.path.join(GPT2_DIR, "merges.txt"),
                                input=path)
        ours, theirs = [], []
        for _ in range(a.repeats):
            theirs.append(child(ref))
            ours.append(prepare_child(path, os.path.join(a.workdir, "out_speed"), "gpt2"))
        best_ours, best_ref = min(ours, key=lambda r: r["seconds"]), min(theirs, key=lambda r: r["seconds"])
        speed = {"input_mib": a.speed_mb, "prepare_tokens_per_s": best_ours["tokens"] / best_ours["seconds"],
                 "reference_tokens_per_s": best_ref["tokens"] / best_ref["seconds"],
                 "prepare_peak_rss_mib": best_ours["peak_rss_mib"], "reference_peak_rss_mib": best_ref["peak_rss_mib"],
                 "prepare_tokens": best_ours["tokens"], "reference_tokens": best_ref["tokens"]}
        speed["ratio"] = speed["prepare_tokens_per_s"] / speed["reference_tokens_per_s"]
        say(f"speed on {a.speed_mb} MiB (gpt2): prepare {speed['prepare_tokens_per_s'] / 1e6:.2f} M tokens/s "
            f"(peak {speed['prepare_peak_rss_mib']:.0f} MiB) vs one-shot encode_batch "
            f"{speed['reference_tokens_per_s'] / 1e6:.2f} M tokens/s (peak {speed['reference_peak_rss_mib']:.0f} MiB): "
            f"ratio {speed['ratio']:.2f}")
    for mb in [int(x) for x in a.sizes_mb.split(",") if x]:
        path = make_input(a.workdir, mb)
        for tok in a.tokenizers.split(","):
            r = prepare_child(path, os.path.join(a.workdir, f"out_{tok}_{mb}"), tok)
            rows.append({"input_mib": mb, "tokenizer": tok, **r, "mb_per_s": mb / r["seconds"],
                         "tokens_per_s": r["tokens"] / r["seconds"]})
            say(f"prepare {tok:5s} {mb:6d} MiB: peak RSS {r['peak_rss_mib']:7.0f} MiB | {r['seconds']:7.1f} s | "
                f"{mb / r['seconds']:6.1f} MiB/s | {r['tokens'] / r['seconds'] / 1e6:6.2f} M tokens/s")
    pairs = translation_rows(a.workdir, [int(x) for x in a.translation_pairs.split(",") if x], a.tokenizer_sample,
                             say)
    if a.json:
        print(json.dumps({"memory": rows, "speed": speed, "translation": pairs, "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
