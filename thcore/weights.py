"""Initial parameters as a function of (seed, parameter name) alone.

A model says how each parameter is distributed (`model.init_spec(name, shape)`: ("normal", std),
("uniform", bound) or ("const", value)); the values are drawn here, on the CPU, in blocks of rows, each block
from its own generator seeded by (seed, name, block). So the numbers depend neither on what builds the model nor
on the order: a model built whole on one device, and one built on the meta device, sharded, and then filled in
where it lives (the FSDP engine: each rank draws only the rows of its own shards, so no rank ever holds the whole
model, or even a whole parameter), start from the same weights at any world size.
"""
import hashlib
import math

import torch
from torch import nn

from . import func
from .config import ConfigError
from .models.layers import sample

BLOCK = 1 << 20   # elements per independently seeded block of rows: a rank draws at most one block beyond its rows


def param_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit seed per (run seed, parameter name, block), the same in every process (str hashes are salted)."""
    digest = hashlib.sha256(f"{seed}/{name}/{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def draw_rows(model: nn.Module, name: str, shape, dtype, seed: int, lo: int = 0, hi: int | None = None):
    """Rows lo:hi (along dim 0; all of them by default) of parameter `name`'s initial value, as a CPU tensor."""
    shape = tuple(shape)
    rows = shape[0] if shape else 1
    hi = rows if hi is None else hi
    rest = shape[1:]
    per_block = max(1, BLOCK // max(1, math.prod(rest)))
    spec = model.init_spec(name, shape)
    out = torch.empty((hi - lo, *rest), dtype=dtype)
    for b in range(lo // per_block, -(-hi // per_block) if hi > lo else 0):
        start, stop = b * per_block, min((b + 1) * per_block, rows)
        block = torch.empty((stop - start, *rest), dtype=dtype)
        sample(spec, block, torch.Generator().manual_seed(param_seed(seed, name, b)))
        a, z = max(start, lo), min(stop, hi)
        out[a - lo:z - lo] = block[a - start:z - start]
    return out.reshape(shape) if not shape else out


def draw(model: nn.Module, like: dict, seed: int, device="cpu") -> dict:
    """{name: initial value on `device`} for the params named (and shaped) as in `like`, one at a time."""
    return {k: draw_rows(model, k, p.shape, p.dtype, seed).to(device) for k, p in like.items()}


def build(model_fn, seed: int, device) -> tuple[nn.Module, dict, dict]:
    """(model, params, buffers): the model built on the meta device, then each parameter drawn and placed on
    `device` (the weights exist once, never as a module copy); `device="meta"` leaves them unallocated for an
    engine to fill in where they live (fill_in). A model without `init_spec` is built whole under `seed`, its own
    init drawing from the global RNG."""
    meta = torch.device(device).type == "meta"
    with torch.device("meta"):
        model = model_fn()
    if not hasattr(model, "init_spec"):   # a model that inits itself: built for real under the seed
        if meta:
            raise ConfigError(f"{type(model).__name__}: building on the meta device (engines fsdp and deepspeed) "
                              "needs the model to say how each parameter is drawn: init_spec(name, shape) and "
                              "init_buffers(device) (see GPT, Transformer)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_fn()
        params, buffers = func.init(model)
        return model, {k: v.to(device) for k, v in params.items()}, {k: v.to(device) for k, v in buffers.items()}
    named = dict(model.named_parameters())   # tied weights once, under their first name
    params = {k: p.detach() for k, p in named.items()} if meta else draw(model, named, seed, device)
    buffers = model.init_buffers("cpu" if meta else device)
    if not meta:   # the module holds the same tensors (activation checkpointing's recompute reads the module's)
        func.bind(model, params, buffers)
    return model, params, buffers


def _local_rows(p) -> tuple[int, int]:
    """The rows lo:hi of the whole parameter that DTensor `p`'s local tensor holds: sharded on dim 0 as
    torch.chunk splits (FSDP2's layout), replicated on any other mesh dimension."""
    from torch.distributed.tensor import Replicate, Shard
    rows = p.shape[0] if p.dim() else 1
    lo, hi = 0, rows
    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            part = torch.arange(lo, hi).chunk(p.device_mesh.size(dim))
            mine = p.device_mesh.get_local_rank(dim)
            lo, hi = (int(part[mine][0]), int(part[mine][-1]) + 1) if mine < len(part) else (hi, hi)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"a parameter placed as {p.placements}: only dim-0 shards and replicas are drawn")
    return lo, hi


def fill_in(model: nn.Module, params: dict, seed: int) -> None:
    """Draw every parameter into `params` (allocated, e.g. by `Module.to_empty`); a DTensor gets the rows of its
    own shard only."""
    from torch.distributed.tensor import DTensor
    with torch.no_grad():
        for name, p in params.items():
            if isinstance(p, DTensor):
                local = p.to_local()
                lo, hi = _local_rows(p)
                assert local.shape[:1] == (hi - lo,) or not p.dim(), (name, local.shape, lo, hi)
                local.copy_(draw_rows(model, name, p.shape, p.dtype, seed, lo, hi).reshape(local.shape))
            else:
                p.copy_(draw_rows(model, name, p.shape, p.dtype, seed))
