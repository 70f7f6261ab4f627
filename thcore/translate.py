"""A trained translation run on new text or on one of its splits.

    python th.py translate RUN_DIR --input=file.txt --beam=5     # or lines on stdin; translations on stdout
    python th.py eval RUN_DIR --split=test [--beam=5]             # one JSON line: bleu, chrf, loss, ...

The run directory gives everything: config.json (model shape, data files, decoding defaults), the saved
vocabularies and the checkpoint (the latest unless --checkpoint names 'best' or a checkpoint dir).
"""
import json
import os
import sys

import torch

from . import checkpoint as ckpt_lib
from .config import ConfigError, field_names, from_dict
from .func import pick_device
from .tasks.translation import TranslationConfig, TranslationTask


def load(run_dir: str, checkpoint: str = "", device: str = "cpu", splits=()):
    """(task, state, checkpoint dir): the run's task with only `splits` read, and its params on `device`."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"run_dir: {run_dir}: no config.json (not a run directory)")
    with open(path) as f:
        values = json.load(f)
    known = set(field_names(TranslationConfig))
    if "d_model" not in values or "train_tgt" not in values:
        raise ConfigError(f"run_dir: {run_dir} is not a translation run")
    cfg = from_dict(TranslationConfig, {**{k: v for k, v in values.items() if k in known}, "out_dir": run_dir,
                                        "data_dir": "", "device": device})
    task = TranslationTask(cfg, log=lambda m: print(m, file=sys.stderr), splits=splits)
    for w in task.warnings:
        print(w, file=sys.stderr)
    # damaged checkpoints are skipped, each named in a warning; an explicit one must be complete
    ckpt = ckpt_lib.pick(run_dir, checkpoint, prefer="latest", log=print)
    if not ckpt_lib.has_params(ckpt):
        raise ConfigError(f"checkpoint: no model.safetensors (or shards) in {ckpt}")
    dev = pick_device(device)
    state = task.init_state(1, device=dev)
    state = state.replace(params=ckpt_lib.load_params(ckpt, state.params))
    print(f"loaded {ckpt}", file=sys.stderr)
    return task, state, ckpt


def translate_main(run_dir: str, input: str = "", beam: int = 0, checkpoint: str = "", device: str = "cpu",
                   batch_size: int = 0):
    """Print one translation per input line (an empty line stays empty: output lines match input lines)."""
    from .data.translation import decode_lines, read_lines
    lines = read_lines(input, "input") if input else decode_lines(sys.stdin.buffer.read(), "<stdin>", "input")
    task, state, _ = load(run_dir, checkpoint, device)
    if batch_size:
        task.cfg.eval_batch_size = batch_size
    keep = [i for i, line in enumerate(lines) if line.strip()]
    out = [""] * len(lines)
    with torch.no_grad():
        for i, text in zip(keep, task.translate(state, [lines[i] for i in keep], state_device(state),
                                                beam or task.cfg.test_beam)):
            out[i] = text
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()


def eval_main(run_dir: str, split: str = "test", beam: int = 0, checkpoint: str = "", device: str = "cpu"):
    """Score a checkpoint on `split` of the run's data; prints one JSON line."""
    if split not in ("train", "valid", "test"):
        raise ConfigError(f"split={split!r}: must be one of 'train', 'valid', 'test'")
    task, state, ckpt = load(run_dir, checkpoint, device, splits=(split,))
    if split not in task.data:
        raise ConfigError(f"split={split!r}: the run has no {split} files ({split}_src / {split}_tgt)")
    beam = beam or (task.cfg.test_beam if split == "test" else task.cfg.eval_beam)
    res = task.evaluate(state, split, beam=beam)
    print(json.dumps({"checkpoint": ckpt, "split": split, "beam": beam, "sentences": len(task.data[split]),
                      **{k: round(v, 4) for k, v in res.items()}, **task.signatures}))


def state_device(state) -> torch.device:
    return next(iter(state.params.values())).device
