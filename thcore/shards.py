"""Sharded checkpoints: every rank writes the rows it holds, in parallel; any world size and any engine reads them.

    checkpoints/step_<N>/model-00000-of-00002.safetensors       rank 0's rows of each sharded param
                         optimizer-00000-of-00002.safetensors   rank 0's rows of the optimizer state
                         ...                                     one pair per rank that holds rows
                         shards.json                             {kind: {name: {shape, dtype, parts}}}

A tensor sharded on dim 0 (FSDP2's layout: `Shard(0)`, `Replicate()` across replicas) is written as the row
ranges its holders have, by the first replica only; a plain tensor (the same on every rank) by rank 0, whole.
`parts` lists `[file, start, stop]` row ranges in order. Reading takes any row range of any tensor from the
files that hold it (safetensors reads the bytes asked for), so a rank loads just its own new shard, whatever the
world size that wrote them; the eager layout (model.safetensors with whole tensors) reads the same way.
"""
import json
import math
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

INDEX = "shards.json"
KINDS = ("model", "optimizer")


def local_rows(t) -> tuple[int, int]:
    """The dim-0 rows [start, stop) of the whole tensor that this rank's shard of DTensor `t` holds (a plain
    tensor: all of them). Shard(0) splits rows as torch.chunk does (ceil(n / k) per shard, the last ones shorter
    or empty)."""
    if not isinstance(t, DTensor):
        return 0, t.shape[0] if t.dim() else 0
    start, stop = 0, t.shape[0]
    coordinate = t.device_mesh.get_coordinate()
    for dim, placement in enumerate(t.placements):
        if placement.is_replicate():
            continue
        if placement.is_shard(0):
            n, k = stop - start, t.device_mesh.size(dim)
            size = math.ceil(n / k)
            start, stop = start + min(n, coordinate[dim] * size), start + min(n, (coordinate[dim] + 1) * size)
        else:
            raise ValueError(f"sharded checkpoints hold dim-0 shards only, not {placement}")
    if stop - start != t.to_local().shape[0]:
        raise ValueError(f"a shard of {tuple(t.shape)} holds {t.to_local().shape[0]} rows, expected {stop - start}")
    return start, stop


def held_rows(t) -> tuple[int, int] | None:
    """local_rows, or None when another rank writes them: the first replica writes a sharded tensor, rank 0 a
    plain one."""
    if not isinstance(t, DTensor):
        return local_rows(t) if _rank() == 0 else None
    coordinate = t.device_mesh.get_coordinate()
    if any(p.is_replicate() and coordinate[d] for d, p in enumerate(t.placements)):
        return None
    return local_rows(t)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def write(directory: str, trees: dict, rank: int, world_size: int) -> dict:
    """Write this rank's rows of `trees` ({kind: {name: tensor}}) into `directory`; returns its part of the
    index, {kind: {name: {"shape", "dtype", "parts": [[file, start, stop]]}}} (empty parts: a replica)."""
    index = {}
    for kind, tensors in trees.items():
        name = f"{kind}-{rank:05d}-of-{world_size:05d}.safetensors"
        mine, index[kind] = {}, {}
        for k, t in tensors.items():
            rows = held_rows(t)
            local = t.to_local() if isinstance(t, DTensor) else t
            index[kind][k] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "parts": []}
            if rows is not None and (rows[1] > rows[0] or t.dim() == 0):
                mine[k] = local.detach().contiguous().cpu()
                index[kind][k]["parts"].append([name, *rows])
        if mine:
            save_file(mine, os.path.join(directory, name), metadata={"format": "pt"})
    return index


def merge(parts: list[dict]) -> dict:
    """The whole index from every rank's part (`write`'s return values, in rank order)."""
    out = {kind: {k: {**v, "parts": []} for k, v in parts[0][kind].items()} for kind in parts[0]}
    for part in parts:
        for kind, tensors in part.items():
            for k, v in tensors.items():
                out[kind][k]["parts"] += v["parts"]
    for tensors in out.values():
        for v in tensors.values():
            v["parts"].sort(key=lambda p: p[1])
    return out


class Reader:
    """Row ranges of the tensors of checkpoint directory `ckpt`, sharded or in the eager layout."""

    EAGER = {"model": "model.safetensors", "optimizer": "optimizer.safetensors"}

    def __init__(self, ckpt: str):
        self.ckpt, self._open = ckpt, {}
        path = os.path.join(ckpt, INDEX)
        if os.path.isfile(path):
            with open(path) as f:
                self.index = json.load(f)
        else:
            self.index = {}
            for kind, name in self.EAGER.items():
                if os.path.isfile(os.path.join(ckpt, name)):
                    f = self._file(name)
                    self.index[kind] = {k: {"shape": list(f.get_slice(k).get_shape()),
                                            "parts": [[name, 0, (f.get_slice(k).get_shape() or [0])[0]]]}
                                        for k in f.keys()}

    @property
    def sharded(self) -> bool:
        return os.path.isfile(os.path.join(self.ckpt, INDEX))

    def _file(self, name: str):
        if name not in self._open:
            self._open[name] = safe_open(os.path.join(self.ckpt, name), framework="pt")
        return self._open[name]

    def names(self, kind: str) -> list[str]:
        return list(self.index.get(kind, {}))

    def shape(self, kind: str, name: str) -> tuple:
        return tuple(self.index[kind][name]["shape"])

    def files(self, kind: str, names, rows=None) -> set[str]:
        """The files holding `names` (each restricted to `rows(name)` -> (start, stop) when given)."""
        out = set()
        for k in names:
            for f, a, b in self.index[kind][k]["parts"]:
                start, stop = rows(k) if rows else (a, b)
                if a < stop and start < b or a == b:
                    out.add(f)
        return out

    def read(self, kind: str, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all of it by default)."""
        entry = self.index[kind][name]
        if not entry["shape"]:   # a scalar (an optimizer step count): one part, whole
            return self._file(entry["parts"][0][0]).get_tensor(name)
        start, stop = start or 0, entry["shape"][0] if stop is None else stop
        pieces = []
        for f, a, b in entry["parts"]:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                pieces.append(self._file(f).get_slice(name)[lo - a:hi - a])
        if sum(p.shape[0] for p in pieces) != stop - start:
            raise ValueError(f"{self.ckpt}: rows {start}:{stop} of {name!r} are not all in the checkpoint")
        return torch.cat(pieces) if len(pieces) != 1 else pieces[0]

    def read_all(self, kind: str) -> dict:
        return {k: self.read(kind, k) for k in self.names(kind)}
