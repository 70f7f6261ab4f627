"""Pytree helpers. Params, grads and optimizer state are plain dicts of tensors (names as in
`named_parameters()`), so these stay tiny; torch's own pytree does the walking."""
import torch
from torch.utils import _pytree as pytree

tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves


def clone(tree):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, tree)


def global_norm(tensors) -> torch.Tensor:
    """L2 norm over all leaves, in fp32, without a host sync."""
    leaves = [t for t in tree_leaves(tensors) if t is not None]
    norms = torch._foreach_norm(leaves, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2.0)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'exp_avg': {'w': t}} -> {'exp_avg/w': t}: one flat name space for safetensors."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        else:
            out[key] = v
    return out


def unflatten(flat: dict) -> dict:
    """Inverse of `flatten` (param names contain dots, never slashes)."""
    out: dict = {}
    for key, v in flat.items():
        *path, leaf = key.split("/")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out
