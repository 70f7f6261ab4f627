"""`th.py export RUN_DIR OUT_DIR --format=...`: a run's weights for use outside torch-handle.

    safetensors   OUT_DIR/model.safetensors (params under their pytree names) + the run's config.json
                  (and model.json / meta.json / tokenizer files when the run has them). From a DeepSpeed
                  run (any ZeRO stage), OUT_DIR is a whole eager checkpoint: the consolidated fp32 params,
                  optimizer.safetensors, state.json and manifest.json, so `--resume=OUT_DIR` continues or
                  evaluates it on the eager or DDP engine.
    hf            a Hugging Face GPT-2 directory (GPT runs): see thcore/interop/hf_gpt2.py

The checkpoint is the best one when evals recorded it, else the latest; `checkpoint` names another
(a checkpoint dir, 'best' or 'latest').
"""
import os
import shutil

from safetensors.torch import save_file

from . import checkpoint as checkpoint_lib
from . import consolidate
from .config import ConfigError
from .interop import hf_gpt2

FORMATS = ("safetensors", "hf")
_RUN_FILES = ("config.json", hf_gpt2.MODEL_JSON, "meta.json", "vocab.json", "merges.txt",
              "vocab.src.json", "vocab.tgt.json", "vocab.joint.json")


def export_safetensors(run_dir: str, out_dir: str, checkpoint: str = "") -> str:
    run = hf_gpt2.run_of(run_dir)
    if run != run_dir and not checkpoint:   # RUN_DIR named one checkpoint dir of a run
        checkpoint = run_dir
    ckpt = hf_gpt2.run_checkpoint(run, checkpoint)
    weights = os.path.join(ckpt, "model.safetensors")
    if checkpoint_lib.is_sharded(ckpt):   # FSDP: every rank's rows, whole again
        os.makedirs(out_dir, exist_ok=True)
        save_file(checkpoint_lib.read_params(ckpt), os.path.join(out_dir, "model.safetensors"),
                  metadata={"format": "pt"})
    elif not os.path.isfile(weights) and os.path.isfile(os.path.join(ckpt, "latest")):
        consolidate.export_eager(ckpt, out_dir)   # a DeepSpeed checkpoint: consolidated into an eager one
    elif not os.path.isfile(weights):
        raise ConfigError(f"{ckpt}: no model.safetensors")
    else:
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(weights, os.path.join(out_dir, "model.safetensors"))
    for name in _RUN_FILES:
        if os.path.isfile(os.path.join(run, name)):
            shutil.copyfile(os.path.join(run, name), os.path.join(out_dir, name))
    return ckpt


def export(run_dir: str, out_dir: str, format: str = "safetensors", checkpoint: str = "") -> str:
    """Write OUT_DIR in `format`; returns the checkpoint dir exported (a damaged newest checkpoint is skipped
    for an older one with a one-line warning on stderr)."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir}: not a directory")
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}: must be one of {', '.join(map(repr, FORMATS))}")
    src = (hf_gpt2.export if format == "hf" else export_safetensors)(run_dir, out_dir, checkpoint)
    # safetensors writes its files 0600: an export is for sharing, with the mode of the files beside it
    checkpoint_lib.plain_mode(os.path.join(out_dir, "model.safetensors"))
    return src
