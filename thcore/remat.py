"""Activation checkpointing applied to a model from outside: the models carry no flag for it.

`checkpoint_blocks(model)` makes each block (every child of the model's `nn.ModuleList`s: GPT's blocks, the
encoder's and decoder's layers) recompute its activations in backward instead of keeping them. The block stays
the same object with the same submodules and parameter names (state_dict keys, FSDP units and init specs are
unchanged): only its class is swapped for a subclass whose call runs the module's own call under
`torch.utils.checkpoint` (non-reentrant: the RNG state is replayed, so the recomputed dropout masks are the same,
and it works with functional_call + autograd.grad). FSDP2's `fully_shard` and `Module.compile` later swap or wrap
the same call, and stay inside the checkpointed region, as the block does. Without grad (evaluation, decoding)
the block runs as it is.

torch.func transforms cannot run through checkpointing ("saved tensor hooks"): `suspended(model)` runs the model
without it for their duration (thcore/research.py).
"""
import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, found from outside: every child of every ModuleList."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


class Checkpointed:
    """The mixin of a checkpointed block's class (made by checkpoint_blocks)."""
    _plain = None   # the class it was before

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


_classes = {}   # one checkpointed subclass per block class (isinstance and pickling see one class)


def _checkpointed(cls):
    if cls not in _classes:
        _classes[cls] = type(f"Checkpointed{cls.__name__}", (Checkpointed, cls), {"_plain": cls})
    return _classes[cls]


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Checkpoint every block of `model` (in place; returns it). Applying it twice changes nothing."""
    for block in blocks(model):
        if not isinstance(block, Checkpointed):
            block.__class__ = _checkpointed(type(block))
    return model


def is_checkpointed(model: nn.Module) -> bool:
    return any(isinstance(b, Checkpointed) for b in blocks(model))


@contextlib.contextmanager
def suspended(model: nn.Module):
    """`model`'s blocks run without checkpointing inside the block (same math, more memory)."""
    done = [b for b in blocks(model) if type(b) in _classes.values()]
    for b in done:
        b.__class__ = b._plain
    try:
        yield model
    finally:
        for b in done:
            b.__class__ = _checkpointed(type(b))
