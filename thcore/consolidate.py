"""DeepSpeed ZeRO checkpoints read back whole, beside the checkpoint and export code: the fp32 params and the
optimizer state of a DeepSpeed checkpoint dir (any stage, any world size) through DeepSpeed's public
`deepspeed.utils.zero_to_fp32`, for `th.py export`, `th.py generate` and `init_from` (thcore/interop/hf_gpt2.py).
No engine is involved: nothing here starts a process group."""
import contextlib
import io
import json
import os
import re
import tempfile

import torch

from . import checkpoint
from .config import ConfigError
from .optim import _groups

INSTALL_HINT = "pip install 'torch-handle[deepspeed]' (or pip install deepspeed)"


def require_deepspeed():
    """The deepspeed module, or a one-line ConfigError saying how to install it."""
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        if e.name != "deepspeed":
            raise
        raise ConfigError(f"engine='deepspeed': DeepSpeed is not installed; {INSTALL_HINT}") from None
    return deepspeed


def _strip(d: dict, names) -> dict:
    """{pytree name: tensor} for the DeepSpeed names in `names` ('model.' is the LossModule's prefix)."""
    return {k[len("model."):]: d[k].detach().float().contiguous().clone() for k in names}


class _Quiet(contextlib.ExitStack):
    def __enter__(self):
        super().__enter__()
        self.enter_context(contextlib.redirect_stdout(io.StringIO()))
        self.enter_context(contextlib.redirect_stderr(io.StringIO()))
        return self


def _natural(name: str):
    """rank order of DeepSpeed's shard files (`..._2_optim_states.pt` before `..._10_...`)"""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _consolidate_as_fp32(tag, tag_dir, optim_files, osd, fp32_key, flat_groups) -> dict:
    """get_fp32_state_dict_from_zero_checkpoint over a copy of the checkpoint in which rank r's fp32 partitions
    are flat_groups[r]: DeepSpeed's consolidation of any tensor partitioned like the master weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(tag_dir))) as tmp:
        os.makedirs(os.path.join(tmp, tag))
        for n in os.listdir(tag_dir):
            if n not in optim_files:   # the model-state files, as they are
                os.symlink(os.path.abspath(os.path.join(tag_dir, n)), os.path.join(tmp, tag, n))
        for f, o, groups in zip(sorted(optim_files, key=_natural), osd, flat_groups):
            inner = {k: v for k, v in o["optimizer_state_dict"].items() if k != fp32_key}
            torch.save({**o, "optimizer_state_dict": {**inner, fp32_key: groups}}, os.path.join(tmp, tag, f))
        return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)


def consolidate(ckpt: str) -> tuple[dict, dict, dict]:
    """(params, flat optimizer state, meta) of DeepSpeed checkpoint dir `ckpt`, any stage and world size, fp32:
    what an eager checkpoint holds. ZeRO 1-3 through DeepSpeed's public get_fp32_state_dict_from_zero_checkpoint
    (exact), for the fp32 master weights and for each optimizer moment (partitioned the same way)."""
    require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import (get_fp32_state_dict_from_zero_checkpoint, get_model_state_file,
                                              get_model_state_files, parse_model_states)
    with open(os.path.join(ckpt, "latest")) as f:
        tag_dir = os.path.join(ckpt, f.read().strip())
    with open(os.path.join(ckpt, "state.json")) as f:
        meta = json.load(f)
    optim_files = sorted(n for n in os.listdir(tag_dir) if n.endswith("_optim_states.pt"))
    if not optim_files:   # stage 0 in fp32: the module and a torch optimizer's state_dict, whole
        sd = torch.load(get_model_state_file(tag_dir, 0), map_location="cpu", weights_only=False)
        seen, names = set(), []
        for k, t in sd["module"].items():   # parameters once (tied ones share storage), in module order
            if k not in sd["buffer_names"] and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                names.append(k)
        params = _strip(sd["module"], names)
        order = [k[len("model."):] for k in names]
        decay, no_decay = _groups({k: params[k] for k in order})   # the groups make_optimizer built
        flat_names = decay + no_decay
        opt = {}
        for i, st in sd["optimizer"]["state"].items():
            for key, v in st.items():
                opt[f"{key}/{flat_names[i]}"] = torch.as_tensor(v, dtype=torch.float32).clone()
        return params, opt, meta
    tag = os.path.basename(tag_dir)
    with _Quiet():   # DeepSpeed narrates every file it reads
        # the fp32 master weights: DeepSpeed's own consolidation, exact for ZeRO 1-3 at any world size
        full = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag)
        shapes = parse_model_states(get_model_state_files(tag_dir))[0].param_shapes
        names = [k for group in shapes for k in group]   # the parameters (no buffers, tied ones once), in order
        params = _strip(full, names)
        # each optimizer moment is partitioned exactly as the master weights: the same public function
        # consolidates it from a copy of the checkpoint whose fp32 partitions are that moment's
        osd = [torch.load(os.path.join(tag_dir, f), map_location="cpu", weights_only=False)
               for f in sorted(optim_files, key=_natural)]
        stage = int(osd[0]["optimizer_state_dict"].get("zero_stage", 1))
        fp32_key, state_key = (("single_partition_of_fp32_groups", "base_optimizer_state") if stage <= 2
                               else ("fp32_flat_groups", "optimizer_state_dict"))
        states = [o["optimizer_state_dict"][state_key]["state"] for o in osd]   # per rank: {group: {key: flat}}
        opt = {}
        for key, v in states[0][0].items():
            if torch.is_tensor(v) and v.dim() == 1:
                moment = _strip(_consolidate_as_fp32(tag, tag_dir, optim_files, osd, fp32_key,
                                                     [[s[g][key] for g in sorted(s)] for s in states]), names)
                opt.update({f"{key}/{k}": t for k, t in moment.items()})
            else:   # the step count: one per group in DeepSpeed, one per param in our optimizer state
                opt.update({f"{key}/{k}": torch.tensor(float(v), dtype=torch.float32) for k in params})
    return params, opt, meta


def export_eager(ckpt: str, out_dir: str) -> None:
    """Write `out_dir` as an eager checkpoint (model.safetensors, optimizer.safetensors, state.json, manifest):
    the eager and DDP engines resume or evaluate it with --resume=OUT_DIR, without DeepSpeed."""
    from safetensors.torch import save_file
    params, opt, meta = consolidate(ckpt)
    os.makedirs(out_dir, exist_ok=True)
    save_file(params, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_file(opt, os.path.join(out_dir, "optimizer.safetensors"), metadata={"format": "pt"})
    files = {"model.safetensors": None, "optimizer.safetensors": None, "state.json": None}
    with open(os.path.join(out_dir, "state.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    for n in files:
        p = os.path.join(out_dir, n)
        files[n] = {"size": os.path.getsize(p), "sha256": checkpoint._sha256(p)}
    with open(os.path.join(out_dir, checkpoint.MANIFEST), "w") as f:
        json.dump({"files": files}, f, indent=2, sort_keys=True)
