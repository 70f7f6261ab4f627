"""Configs: attrs classes with validation, command-line overrides and a JSON round-trip.

A recipe subclasses one of these and changes defaults; `th.py run RECIPE --field=value` overrides fields.
Every problem is reported as one `ConfigError` line that names the field, before any work starts.
"""
import difflib
import json
import os
import types
import typing

import attrs


class ConfigError(ValueError):
    """A bad config value or unknown field; the message is one line that names the field."""


class PeerFailed(ConfigError):
    """Another rank met the bad input and reports it; this rank leaves with the same status, saying nothing."""


GROUPS = ("model", "data", "optimisation", "precision/speed", "engine/distribution", "checkpoints/faults",
          "logging/eval", "research probes")


def field(default=attrs.NOTHING, help: str = "", group: str = "", validator=None, factory=None):
    """A config field with its one-line `help` and its `group` (one of GROUPS): `th.py run RECIPE --help`, the
    docs and validation all read this one declaration. A recipe that re-declares the field to change its default
    keeps this help (help() looks it up through the class hierarchy)."""
    if group and group not in GROUPS:
        raise ValueError(f"group {group!r}: not one of {GROUPS}")
    return attrs.field(default=default, factory=factory, validator=validator,
                       metadata={"help": help, "group": group})


def _choice(*allowed):
    def check(inst, attr, value):
        if value not in allowed:
            raise ConfigError(f"{attr.name}={value!r}: must be one of {', '.join(map(repr, allowed))}")
    return check


def _number(attr, value):
    """Range validators run before __attrs_post_init__'s type check: a string must not reach `<`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{attr.name}={value!r}: expected a number")


def _positive(inst, attr, value):
    _number(attr, value)
    if value <= 0:
        raise ConfigError(f"{attr.name}={value!r}: must be > 0")


def _non_negative(inst, attr, value):
    _number(attr, value)
    if value < 0:
        raise ConfigError(f"{attr.name}={value!r}: must be >= 0")


def _unit(inst, attr, value):
    _number(attr, value)
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{attr.name}={value!r}: must be in [0, 1)")


@attrs.define(kw_only=True)
class Config:
    """Fields every recipe has (docs/ARCHITECTURE.md: the run directory and the fields' contract)."""
    name: str = field("run", "recipe name; out_dir defaults to runs/<name>", "logging/eval")
    out_dir: str = field("", "run directory ('' = runs/<name>)", "checkpoints/faults")
    seed: int = field(0, "seed of init, dropout and data order", "optimisation")
    engine: str = field("eager", "eager (one process) | ddp | fsdp | deepspeed", "engine/distribution",
                        _choice("eager", "ddp", "fsdp", "deepspeed"))
    device: str = field("auto", "auto (a GPU if there is one) | cpu | cuda", "engine/distribution",
                        _choice("auto", "cpu", "cuda"))
    nproc: int = field(1, "processes th.py starts for ddp/deepspeed on a CPU-only machine (GPUs: one each)",
                       "engine/distribution", _positive)
    # schedule of the run
    max_steps: int = field(0, "optimizer steps; 0 = run `epochs` epochs", "optimisation", _non_negative)
    epochs: int = field(1, "passes over the training data (when max_steps = 0)", "optimisation", _positive)
    max_minutes: float = field(0.0, "> 0: time budget of the run; the lr decay follows the time used",
                               "optimisation", _non_negative)
    batch_size: int = field(32, "examples per device per micro-step", "data", _positive)
    grad_accum: int = field(1, "micro-steps per optimizer step", "optimisation", _positive)
    num_workers: int = field(0, "DataLoader worker processes (0 = batches built in the training process)", "data",
                             _non_negative)
    # optimizer
    optimizer: str = field("adamw", "adamw | sgd", "optimisation", _choice("adamw", "sgd"))
    lr: float = field(3e-4, "peak learning rate", "optimisation", _positive)
    beta1: float = field(0.9, "AdamW beta1", "optimisation", _unit)
    beta2: float = field(0.98, "AdamW beta2", "optimisation", _unit)
    eps: float = field(1e-9, "AdamW epsilon", "optimisation", _positive)
    momentum: float = field(0.9, "SGD momentum", "optimisation", _unit)
    weight_decay: float = field(0.0, "decoupled weight decay (matrices only; no decay on biases, norms)",
                                "optimisation", _non_negative)
    warmup_steps: int = field(0, "linear warm-up steps", "optimisation", _non_negative)
    lr_schedule: str = field("cosine", "after warm-up: constant | cosine | linear | inverse_sqrt", "optimisation",
                             _choice("constant", "cosine", "linear", "inverse_sqrt"))
    min_lr_ratio: float = field(0.1, "cosine/linear floor as a fraction of lr", "optimisation", _non_negative)
    clip_grad: float = field(1.0, "clip the global gradient norm to this; 0 = no clipping", "optimisation",
                             _non_negative)
    label_smoothing: float = field(0.0, "label smoothing of the cross-entropy", "optimisation", _unit)
    # numerics and speed
    precision: str = field("fp32", "fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scale)",
                           "precision/speed", _choice("fp32", "bf16", "fp16"))
    compile: bool = field(False, "torch.compile the step", "precision/speed")
    activation_checkpointing: bool = field(False, "recompute each block's activations in backward (less memory)",
                                           "precision/speed")
    # speed switches (docs/PERFORMANCE.md; eager engine): each also runs on CPU, as a no-op or its CPU equivalent
    ce_chunk: int = field(0, "> 0: output layer + loss fused, in chunks of this many rows (eager, ddp engines)",
                          "precision/speed", _non_negative)
    sdpa_backend: str = field("auto", "attention kernel: auto | flash | efficient | cudnn | math (eager engine)",
                              "precision/speed", _choice("auto", "flash", "efficient", "cudnn", "math"))
    cuda_graphs: bool = field(False, "compile with CUDA graphs (mode='reduce-overhead'); implies compile",
                              "precision/speed")
    optimizer_impl: str = field("auto", "torch optimizer kernel: auto | fused | foreach | for_loop",
                                "precision/speed", _choice("auto", "fused", "foreach", "for_loop"))
    profile: bool = field(False, "torch.profiler traces + summary under <run dir>/profile (rank 0)",
                          "precision/speed")
    profile_steps: int = field(10, "steps the profiler records", "precision/speed", _positive)
    # logging, eval, checkpoints
    log_every: int = field(10, "steps between train lines (and the ranks' agreement on stops)", "logging/eval",
                           _positive)
    eval_every: int = field(0, "steps between evaluations; 0 = at the end of each epoch", "logging/eval",
                            _non_negative)
    early_stop_patience: int = field(0, "evals without a better val loss before stopping; 0 = off",
                                     "logging/eval", _non_negative)
    wandb_project: str = field("", "also log to this Weights & Biases project (extra [wandb]; WANDB_MODE=offline "
                               "works without a network); '' = off", "logging/eval")
    checkpoint_every: int = field(0, "steps between checkpoints; 0 = at evals and at the end",
                                  "checkpoints/faults", _non_negative)
    always_save_checkpoint: bool = field(True, "False: eval steps save only when val loss improves (nanoGPT)",
                                         "checkpoints/faults")
    keep_checkpoints: int = field(3, "newest checkpoints kept (the best one is kept as well)", "checkpoints/faults",
                                  _positive)
    resume: str = field("auto", "auto (the run dir's latest checkpoint) | never | PATH to a run dir or checkpoint",
                        "checkpoints/faults")
    async_checkpoint: bool = field(False, "write checkpoints in a background thread: training waits only for a "
                                   "host copy of the state (one more copy of it in host memory)", "checkpoints/faults")
    # fault tolerance (docs/RELIABILITY.md)
    checkpoint_every_s: float = field(0.0, "seconds between checkpoints; 0 = off", "checkpoints/faults",
                                      _non_negative)
    nan_policy: str = field("skip", "a non-finite step: skip (keep params) | stop (save, exit 3)",
                            "checkpoints/faults", _choice("skip", "stop"))
    max_restarts: int = field(0, "torchrun --max-restarts: restart the group from the latest checkpoint",
                              "checkpoints/faults", _non_negative)
    # research probes (thcore/research.py)
    ema_decay: float = field(0.0, "> 0: EMA of the params, evaluated (ema_* metrics) and saved", "research probes",
                             _unit)
    log_grad_noise: bool = field(False, "train lines get the gradient noise scale (per-example gradients)",
                                 "research probes")
    sharpness_every: int = field(0, "steps between top Hessian eigenvalue estimates (a multiple of log_every); "
                                    "0 = off", "research probes", _non_negative)
    # distributed (engine="ddp" or "deepspeed" under torchrun)
    dist_timeout_s: int = field(600, "collective timeout in seconds: a dead or hung peer ends the run",
                                "engine/distribution", _positive)
    ddp_comm_hook: str = field("allreduce", "DDP gradient communication: allreduce | bf16_compress | "
                                            "fp16_compress | powersgd", "engine/distribution",
                               _choice("allreduce", "bf16_compress", "fp16_compress", "powersgd"))
    bucket_cap_mb: float = field(25.0, "DDP gradient bucket size (MB)", "engine/distribution", _positive)
    powersgd_rank: int = field(1, "PowerSGD matrix rank", "engine/distribution", _positive)
    powersgd_start_iter: int = field(10, "PowerSGD: plain all-reduce for this many steps first",
                                     "engine/distribution", _non_negative)
    # FSDP2 (used by engine="fsdp")
    dp_replicate: int = field(1, "fsdp: replicas (e.g. nodes) of a 2-D mesh; the model is sharded within each",
                              "engine/distribution", _positive)
    dp_shard: int = field(0, "fsdp: ranks each model is sharded over; 0 = all the ranks dp_replicate leaves",
                          "engine/distribution", _non_negative)
    reshard_after_forward: bool = field(True, "fsdp: free gathered params after each block's forward (False: "
                                              "keep them for backward, more memory, less communication)",
                                        "engine/distribution")
    # DeepSpeed (used by engine="deepspeed")
    zero_stage: int = field(0, "DeepSpeed ZeRO stage 0 | 1 | 2 | 3", "engine/distribution", _choice(0, 1, 2, 3))
    offload: str = field("none", "offload of optimizer state (DeepSpeed; ZeRO-3 and fsdp: params and gradients "
                                 "too): none | cpu | nvme (DeepSpeed)",
                         "engine/distribution", _choice("none", "cpu", "nvme"))
    deepspeed_config: str = field("", "a ds_config.json used as-is instead of the one built from these fields",
                                  "engine/distribution")
    nvme_path: str = field("/tmp/thcore_nvme", "offload='nvme' swap directory", "engine/distribution")

    def __attrs_post_init__(self):
        # types first, also for configs built in code (from_dict already coerced CLI/JSON values): a range check
        # on a string would fail with a TypeError instead of one line naming the field
        for f in attrs.fields(type(self)):
            if f.type in (int, float, bool):
                setattr(self, f.name, _coerce(f.name, f.type, getattr(self, f.name)))
            elif f.type is str and not isinstance(getattr(self, f.name), str):
                raise ConfigError(f"{f.name}={getattr(self, f.name)!r}: expected str")
        # A recipe that re-declares a field to change its default drops the base class's attrs validator:
        # run every validator declared for the field anywhere in the class hierarchy.
        for klass in type(self).__mro__[1:]:
            if attrs.has(klass):
                for f in attrs.fields(klass):
                    if f.validator is not None:
                        f.validator(self, f, getattr(self, f.name))
        self.validate()

    def validate(self):
        """Cross-field checks; subclasses extend (attrs validators check single fields)."""
        if self.resume not in ("auto", "never") and not self.resume:
            raise ConfigError("resume='': must be 'auto', 'never' or a path")
        if self.resume not in ("auto", "never") and not os.path.exists(self.resume):
            raise ConfigError(f"resume={self.resume!r}: no such file or directory (or use 'auto' / 'never')")
        if self.checkpoint_every and self.checkpoint_every_s:
            raise ConfigError(f"checkpoint_every_s={self.checkpoint_every_s:g}: set either checkpoint_every (steps) "
                              f"or checkpoint_every_s (seconds), not both (checkpoint_every={self.checkpoint_every})")
        if not self.name:
            raise ConfigError("name='': must not be empty (it names the run directory runs/<name>)")
        if self.engine == "fsdp" and self.offload not in ("none", "cpu"):
            raise ConfigError(f"offload={self.offload!r}: engine='fsdp' offloads to 'cpu' only")
        defaults = {f.name: f.default for f in attrs.fields(Config)}
        for f, engines in _ENGINE_FIELDS.items():   # a field the chosen engine would silently ignore
            if self.engine not in engines and getattr(self, f) != defaults[f]:
                raise ConfigError(f"{f}={getattr(self, f)!r}: only used with engine="
                                  f"{' or '.join(map(repr, engines))}, not engine={self.engine!r}")

    @property
    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.name}"

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# fields that only some engines use: FSDP and DeepSpeed run the module's own forward (no fused loss, no kernel
# choice, no CUDA graphs of the functional step); DDP wraps the model with its loss, fused or not
_ENGINE_FIELDS = {"ce_chunk": ("eager", "ddp"), "sdpa_backend": ("eager",), "cuda_graphs": ("eager",),
                  "async_checkpoint": ("eager", "ddp"),
                  "ddp_comm_hook": ("ddp",), "bucket_cap_mb": ("ddp",), "powersgd_rank": ("ddp",),
                  "powersgd_start_iter": ("ddp",), "nvme_path": ("deepspeed",),
                  "dp_replicate": ("fsdp",), "dp_shard": ("fsdp",), "reshard_after_forward": ("fsdp",),
                  "zero_stage": ("deepspeed",), "deepspeed_config": ("deepspeed",), "offload": ("deepspeed", "fsdp")}


def field_names(cls) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def _coerce(name: str, typ, value):
    """fire parses '--lr=1' as int and '--x=True' as bool; bring values to the field's declared type."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):   # `str | None`: accept None or the inner type
        inner = [t for t in typing.get_args(typ) if t is not type(None)]
        return None if value is None else _coerce(name, inner[0], value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif typ in (int, float):   # a number, or its text; an int field takes a whole float (1.0), never a bool
        if isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and (
                typ is float or isinstance(value, int) or value.is_integer()):
            return typ(value)
    elif typ is str:
        return value if isinstance(value, str) else str(value)
    elif typ is dict:
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{name}={value!r}: expected {getattr(typ, '__name__', typ)}")


def from_dict(cls, values: dict, base=None):
    """Build `cls` from `values` on top of `base` (an instance) or the class defaults.

    Unknown names are an error listing the valid fields (and the closest one)."""
    fields = {f.name: f for f in attrs.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config field {k!r}{hint}; valid fields: {', '.join(sorted(fields))}")
    merged = attrs.asdict(base, recurse=False) if base is not None else {}
    for k, v in values.items():
        merged[k] = _coerce(k, fields[k].type, v)
    return cls(**merged)


def load_json(cls, path: str):
    with open(path) as f:
        return from_dict(cls, json.load(f))
