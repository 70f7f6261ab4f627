"""Models are nn.Module *definitions*; training runs them over an explicit params dict."""
import torch
from torch import nn
from torch.func import functional_call


def init(model: nn.Module) -> tuple[dict, dict]:
    """(params, buffers) as fresh dicts of detached tensors, names as in `named_parameters()`.

    The tensors share the module's storage: the weights exist once (a 6B model holds 24 GB in fp32), and the
    module's own tensors are never read while training (functional_call substitutes the state's). Tied weights
    appear once (named_parameters de-duplicates); functional_call ties them again."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    return params, buffers


def bind(model: nn.Module, params: dict, buffers: dict) -> dict:
    """Make `model`'s parameters and buffers *be* the state's tensors (shared storage, tied weights kept tied).

    Returns {name: nn.Parameter}: where DDP leaves the gradients (`.grad`)."""
    new = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        mod, _, leaf = name.rpartition(".")
        if id(p) not in new:   # tied weights: the first name is the one in `params` (named_parameters' dedup)
            new[id(p)] = nn.Parameter(params[name])   # a Parameter around a tensor shares its storage
        setattr(model.get_submodule(mod), leaf, new[id(p)])
    bind_buffers(model, buffers)
    bound = dict(model.named_parameters())
    assert bound.keys() == params.keys() and all(bound[k].data_ptr() == t.data_ptr() for k, t in params.items())
    return bound


def bind_buffers(model: nn.Module, buffers: dict) -> None:
    for name, b in buffers.items():
        mod, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(mod), leaf, b)   # an existing buffer name: stays a (non-)persistent buffer


class _Method(nn.Module):
    """Lets functional_call reach a method other than forward (e.g. encode/decode for decoding)."""

    def __init__(self, model, method):
        super().__init__()
        self.m, self.method = model, method

    def forward(self, *args, **kwargs):
        return getattr(self.m, self.method)(*args, **kwargs)


def apply(model: nn.Module, params: dict, buffers: dict, *args, method: str = "forward", **kwargs):
    """`model.<method>(*args)` computed with `params` and `buffers` in place of the module's own tensors."""
    if method == "forward":
        return functional_call(model, {**params, **buffers}, args, kwargs)
    wrapper = _Method(model, method)
    tensors = {f"m.{k}": v for k, v in {**params, **buffers}.items()}
    return functional_call(wrapper, tensors, args, kwargs)


def num_params(params: dict) -> int:
    return sum(p.numel() for p in params.values())


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        from .config import ConfigError
        raise ConfigError("device='cuda': CUDA is not available on this machine (use device='cpu' or 'auto')")
    return torch.device(name)
