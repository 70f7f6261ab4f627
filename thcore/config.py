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
    """Fields every recipe has (DESIGN.md §4)."""
    name: str = "run"                       # recipe name; out_dir defaults to runs/<name>
    out_dir: str = ""                        # run directory ("" = runs/<name>)
    seed: int = 0
    engine: str = attrs.field(default="eager", validator=_choice("eager", "ddp", "deepspeed"))
    device: str = attrs.field(default="auto", validator=_choice("auto", "cpu", "cuda"))
    nproc: int = attrs.field(default=1, validator=_positive)   # processes th.py starts for ddp/deepspeed
    # schedule of the run
    max_steps: int = attrs.field(default=0, validator=_non_negative)   # 0 = run `epochs` epochs
    epochs: int = attrs.field(default=1, validator=_positive)
    batch_size: int = attrs.field(default=32, validator=_positive)     # per device, per micro-step
    grad_accum: int = attrs.field(default=1, validator=_positive)
    num_workers: int = attrs.field(default=0, validator=_non_negative)
    # optimizer
    optimizer: str = attrs.field(default="adamw", validator=_choice("adamw", "sgd"))
    lr: float = attrs.field(default=3e-4, validator=_positive)
    beta1: float = attrs.field(default=0.9, validator=_unit)
    beta2: float = attrs.field(default=0.98, validator=_unit)
    eps: float = attrs.field(default=1e-9, validator=_positive)
    momentum: float = attrs.field(default=0.9, validator=_unit)
    weight_decay: float = attrs.field(default=0.0, validator=_non_negative)
    warmup_steps: int = attrs.field(default=0, validator=_non_negative)
    lr_schedule: str = attrs.field(default="cosine", validator=_choice("constant", "cosine", "linear", "inverse_sqrt"))
    min_lr_ratio: float = attrs.field(default=0.1, validator=_non_negative)
    clip_grad: float = attrs.field(default=1.0, validator=_non_negative)   # 0 = no clipping
    label_smoothing: float = attrs.field(default=0.0, validator=_unit)
    # numerics and speed
    precision: str = attrs.field(default="fp32", validator=_choice("fp32", "bf16", "fp16"))
    compile: bool = False
    activation_checkpointing: bool = False
    # speed switches (docs/PERFORMANCE.md; eager engine): each also runs on CPU, as a no-op or its CPU equivalent
    ce_chunk: int = attrs.field(default=0, validator=_non_negative)   # > 0: output layer + loss fused, in chunks
    sdpa_backend: str = attrs.field(default="auto", validator=_choice("auto", "flash", "efficient", "cudnn", "math"))
    cuda_graphs: bool = False               # compile with CUDA graphs (mode="reduce-overhead"); implies compile
    optimizer_impl: str = attrs.field(default="auto", validator=_choice("auto", "fused", "foreach", "for_loop"))
    profile: bool = False                   # torch.profiler traces + summary under <run dir>/profile (rank 0)
    profile_steps: int = attrs.field(default=10, validator=_positive)
    # logging, eval, checkpoints
    log_every: int = attrs.field(default=10, validator=_positive)
    eval_every: int = attrs.field(default=0, validator=_non_negative)   # 0 = at the end of each epoch
    checkpoint_every: int = attrs.field(default=0, validator=_non_negative)   # steps; 0 = at eval and at the end
    keep_checkpoints: int = attrs.field(default=3, validator=_positive)
    resume: str = "auto"                    # auto | never | PATH to a run dir or checkpoint
    # fault tolerance (docs/RELIABILITY.md)
    checkpoint_every_s: float = attrs.field(default=0.0, validator=_non_negative)   # seconds; 0 = off
    nan_policy: str = attrs.field(default="skip", validator=_choice("skip", "stop"))   # a non-finite step
    max_restarts: int = attrs.field(default=0, validator=_non_negative)   # th.py run: torchrun --max-restarts
    # research probes (thcore/research.py)
    ema_decay: float = attrs.field(default=0.0, validator=_unit)   # > 0: EMA of the params, evaluated and saved
    log_grad_noise: bool = False            # train lines get the gradient noise scale from per-example gradients
    sharpness_every: int = attrs.field(default=0, validator=_non_negative)   # steps (a multiple of log_every); 0 = off
    # distributed (engine="ddp" or "deepspeed" under torchrun)
    dist_timeout_s: int = attrs.field(default=600, validator=_positive)   # collective timeout: a dead peer ends the run
    ddp_comm_hook: str = attrs.field(default="allreduce",
                                     validator=_choice("allreduce", "bf16_compress", "fp16_compress", "powersgd"))
    bucket_cap_mb: float = attrs.field(default=25.0, validator=_positive)
    powersgd_rank: int = attrs.field(default=1, validator=_positive)
    powersgd_start_iter: int = attrs.field(default=10, validator=_non_negative)
    # DeepSpeed (used by engine="deepspeed")
    zero_stage: int = attrs.field(default=0, validator=_choice(0, 1, 2, 3))
    offload: str = attrs.field(default="none", validator=_choice("none", "cpu", "nvme"))
    deepspeed_config: str = ""              # a ds_config.json used as-is instead of the one built from these fields
    nvme_path: str = "/tmp/thcore_nvme"     # offload="nvme" swap directory

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
        if self.engine != "eager":   # DDP and DeepSpeed run the module's own forward: these would be ignored
            for f, default in (("ce_chunk", 0), ("sdpa_backend", "auto"), ("cuda_graphs", False)):
                if getattr(self, f) != default:
                    raise ConfigError(f"{f}={getattr(self, f)!r}: only used with engine='eager', not "
                                      f"engine={self.engine!r}")
        if self.engine != "deepspeed":   # DeepSpeed-only fields would be silently ignored
            for f, default in (("zero_stage", 0), ("offload", "none"), ("deepspeed_config", "")):
                if getattr(self, f) != default:
                    raise ConfigError(f"{f}={getattr(self, f)!r}: only used with engine='deepspeed', not "
                                      f"engine={self.engine!r}")

    @property
    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.name}"

    def to_dict(self) -> dict:
        return attrs.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


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
    elif typ is int:
        if isinstance(value, bool):
            pass
        elif isinstance(value, int):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        elif isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
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
