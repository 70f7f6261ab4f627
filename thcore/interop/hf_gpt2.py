"""Hugging Face GPT-2 weights in and out of our GPT (thcore/models/gpt.py).

Both models use the same parameter names (`transformer.h.0.attn.c_attn.weight`, ...), nanoGPT's layout. Two
differences: HF's attention and MLP projections are `Conv1D` layers whose weight is stored [in, out], the
transpose of nn.Linear's [out, in]; and HF checkpoints saved from `GPT2Model` (the hub's `gpt2` files) have no
`transformer.` prefix and carry the causal-mask buffers `attn.bias` / `attn.masked_bias`, which are not weights.
The output layer is tied to `wte` in both, so `lm_head.weight` is never stored on our side.

Directories read here:
  - a Hugging Face directory: config.json (model_type gpt2) + model.safetensors (or sharded, with
    model.safetensors.index.json). pytorch_model.bin is refused: it is a pickle.
  - a run directory of ours: model.json (its GPTConfig, models/gpt.py) + checkpoints/; the best checkpoint
    is used when one was recorded, else the latest (or name one with `checkpoint=`).
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .. import checkpoint as ckpt_lib
from .. import consolidate
from ..config import ConfigError
from ..data import lm as lm_data
from ..models.gpt import GPTConfig, pad_vocab

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MODEL_JSON = "model.json"
_NOT_WEIGHTS = (".attn.bias", ".attn.masked_bias")   # HF's causal-mask buffers in older checkpoints


# -- config ----------------------------------------------------------------------------------------------
def read_hf_config(path: str) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config.json; refuses variants our GPT does not compute."""
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    if hf.get("model_type") != "gpt2":
        raise ConfigError(f"{path}/config.json: model_type={hf.get('model_type')!r}, expected 'gpt2'")
    n_embd = hf.get("n_embd", 768)
    checks = {   # field: (value, what our GPT computes)
        "n_inner": (hf.get("n_inner"), (None, 4 * n_embd)),
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "add_cross_attention": (hf.get("add_cross_attention", False), (False,)),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), (True,)),
    }
    for name, (value, ok) in checks.items():
        if value not in ok:
            raise ConfigError(f"{path}/config.json: {name}={value!r} is not supported (our GPT computes {ok[-1]!r})")
    return GPTConfig(vocab_size=hf.get("vocab_size", 50257), block_size=hf.get("n_positions", 1024),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd, bias=True)


def hf_config(config: GPTConfig | dict, eot: int | None = None) -> dict:
    """config.json for GPT2LMHeadModel with our GPT's shape, a GPTConfig or its dict (bias=False models are
    written with zero biases)."""
    c = config if isinstance(config, GPTConfig) else GPTConfig.from_dict(config)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
        "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot, "dtype": "float32",
    }


# -- weights ---------------------------------------------------------------------------------------------
def read_hf_weights(path: str) -> dict:
    """The tensors of a Hugging Face directory (one safetensors file or shards)."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        out = {}
        for s in shards:
            out.update(load_file(os.path.join(path, s)))
        return out
    if os.path.isfile(os.path.join(path, "pytorch_model.bin")):
        raise ConfigError(f"{path}: only pytorch_model.bin (a pickle, not loaded here); convert it to safetensors "
                          "with transformers: from_pretrained(path).save_pretrained(path, safe_serialization=True)")
    raise ConfigError(f"{path}: no model.safetensors")


def from_hf(sd: dict) -> dict:
    """Our params from a Hugging Face GPT-2 state dict (Conv1D weights transposed, buffers dropped)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_NOT_WEIGHTS) or k == "lm_head.weight":
            continue
        name = k if k.startswith("transformer.") else f"transformer.{k}"
        out[name] = v.t().contiguous() if name.endswith(CONV1D) else v
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], out["transformer.wte.weight"]):
        raise ConfigError("lm_head.weight differs from transformer.wte.weight: our GPT ties them")
    return out


def to_hf(params: dict, n_layer: int, vocab_size: int | None = None) -> dict:
    """A GPT2LMHeadModel state dict (lm_head tied, so left out) from our params; a padded token embedding
    (GPT's vocab_multiple) is cropped to `vocab_size` rows."""
    sd = {k: (v.t() if k.endswith(CONV1D) else v).detach().cpu().contiguous() for k, v in params.items()}
    if vocab_size is not None:
        sd["transformer.wte.weight"] = sd["transformer.wte.weight"][:vocab_size].contiguous()
    # a bias=False GPT: HF always has biases, and zeros compute the same thing (dim = the weight's rows)
    layers = [f"transformer.h.{i}.{m}" for i in range(n_layer)
              for m in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    for m in layers + ["transformer.ln_f"]:
        w = params[f"{m}.weight"]
        sd.setdefault(f"{m}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
    return sd


# -- loading either kind of directory --------------------------------------------------------------------
def is_hf_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg) or os.path.isfile(os.path.join(path, MODEL_JSON)):
        return False
    with open(cfg) as f:
        return json.load(f).get("model_type") == "gpt2"


def run_checkpoint(run_dir: str, checkpoint: str = "") -> str:
    """The checkpoint dir of a run to read weights from: `checkpoint` (a path, 'best' or 'latest'), by default
    the best one when evals recorded it, else the latest."""
    return ckpt_lib.pick(run_dir, checkpoint, prefer="best")   # damaged ones skipped, each named in a warning


def load_gpt(path: str, checkpoint: str = "", vocab_multiple: int = 0) -> tuple[GPTConfig, dict, str]:
    """(GPTConfig, params, where the weights came from) for a Hugging Face GPT-2 directory, a run directory of
    ours, or one checkpoint dir of a run. `vocab_multiple` > 0: the token embedding is brought to that
    multiple's rows (zero rows added, or pad rows of another multiple cut) for a GPT built with it, and the
    config says so. A run's model.json without `vocab_multiple` was written before padding: its rows are
    unpadded."""
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: not a directory")
    config, params, src = _load_gpt(path, checkpoint)
    if vocab_multiple:
        config = config.replace(vocab_multiple=vocab_multiple)
        params = pad_vocab(params, config.rows)
    return config, params, src


def _load_gpt(path: str, checkpoint: str):
    if is_hf_dir(path):
        return read_hf_config(path), from_hf(read_hf_weights(path)), path
    run_dir = path
    if os.path.isfile(os.path.join(path, "state.json")):   # a checkpoint dir: <run>/checkpoints/step_N
        run_dir, checkpoint = os.path.dirname(os.path.dirname(os.path.abspath(path))), path
    if not os.path.isfile(os.path.join(run_dir, MODEL_JSON)):
        raise ConfigError(f"{path}: neither a GPT run directory (no {MODEL_JSON}) nor a Hugging Face GPT-2 "
                          "directory (config.json with model_type 'gpt2')")
    config = read_model_json(run_dir)
    ckpt = run_checkpoint(run_dir, checkpoint)
    if ckpt_lib.has_params(ckpt):   # whole or sharded (FSDP) params
        return config, ckpt_lib.read_params(ckpt), ckpt
    if os.path.isfile(os.path.join(ckpt, "latest")):   # a DeepSpeed checkpoint (its own tag dir inside)
        params, _, _ = consolidate.consolidate(ckpt)
        return config, params, ckpt
    raise ConfigError(f"{ckpt}: no model.safetensors")


def read_model_json(run_dir: str) -> GPTConfig:
    """The GPTConfig a GPT run wrote (tasks/lm.py: save_assets)."""
    p = os.path.join(run_dir, MODEL_JSON)
    with open(p) as f:
        try:
            return GPTConfig.from_dict(json.load(f))
        except ValueError as e:
            raise ConfigError(f"{p}: {e}") from None


def write_model_json(run_dir: str, config: GPTConfig) -> None:
    with open(os.path.join(run_dir, MODEL_JSON), "w") as f:
        json.dump(config.to_dict(), f, indent=1)


def tokenizer_dir_of(path: str) -> str | None:
    """Where the tokenizer of a run / export / prepared directory lives (its meta.json or vocab.json), if any."""
    path = run_of(path)
    for name in (lm_data.META, "vocab.json"):
        if os.path.isfile(os.path.join(path, name)):
            return path
    return None


def run_of(path: str) -> str:
    """The directory holding the run's files, for a run dir or one of its checkpoint dirs."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return os.path.dirname(os.path.dirname(os.path.abspath(path)))
    return path


# -- export ----------------------------------------------------------------------------------------------
def export(run_dir: str, out_dir: str, checkpoint: str = "") -> str:
    """Write `out_dir` as a directory GPT2LMHeadModel.from_pretrained loads (config.json, model.safetensors),
    with the run's meta.json (and BPE files) beside them. Returns the checkpoint dir exported."""
    config, params, ckpt = load_gpt(run_dir, checkpoint)
    run = run_of(run_dir)
    meta = lm_data.read_meta(run) if os.path.isfile(os.path.join(run, lm_data.META)) else None
    os.makedirs(out_dir, exist_ok=True)
    save_file(to_hf(params, config.n_layer, config.vocab_size), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(config, (meta or {}).get("tokenizer", {}).get("eot")), f, indent=2)
    if meta is not None:   # `th.py generate OUT_DIR` then decodes as the run did
        lm_data.copy_tokenizer(run, out_dir, meta)
    return ckpt
