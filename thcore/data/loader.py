"""Deterministic, resumable batching: the order of epoch `e` is a function of (seed, e) alone, so a run
resumed at micro-batch `start` of an epoch sees exactly the batches the uninterrupted run saw."""
import attrs
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler


def epoch_batches(dataset, batch_size: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's index batches for `epoch`: DistributedSampler's shard of a (seed, epoch) permutation."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    return list(BatchSampler(sampler, batch_size, drop_last=True))


def make_loader(dataset, batches: list[list[int]], collate, num_workers: int = 0, device=None):
    pin = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=num_workers,
                      pin_memory=pin, persistent_workers=False)


def to_device(batch: dict, device) -> dict:
    """On CUDA through pinned memory, so the copy is asynchronous (non_blocking) and overlaps the running step."""
    if torch.device(device).type == "cuda":
        return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def device_batches(batches, device):
    """`batches` moved to `device` one at a time, each as the loop asks for it: the loop asks right after it
    queued the previous step, so on CUDA this batch's loading and copy overlap that step. The wait for the
    loader is a `data_wait` range in profiles (thcore/profiler.py)."""
    from ..profiler import data_wait
    it = iter(batches)
    while True:
        with data_wait():
            batch = next(it, None)
            if batch is None:
                return
            batch = to_device(batch, device)
        yield batch


@attrs.frozen
class StepBatch:
    """The micro-batches of one optimizer step and where they sit in the data."""
    micro: list
    epoch: int
    before: dict   # the data cursor {"epoch", "index"} before them
    after: dict    # ... after them: after an epoch's last step, the next epoch's start

    @property
    def epoch_end(self) -> bool:
        return self.after["epoch"] != self.epoch


def step_batches(task, engine, grad_accum: int, cursor: dict):
    """Every optimizer step's micro-batches (StepBatch) from the data cursor on, on the engine's device, across
    epochs for as long as it is asked. An epoch's micro-batches that do not fill a last step are left out."""
    per_epoch = task.batches_per_epoch(engine.world_size) // grad_accum * grad_accum
    epoch, index = cursor["epoch"], cursor["index"]
    while True:
        group = []
        for batch in device_batches(task.train_loader(epoch, index, engine), engine.device):
            group.append(batch)
            if len(group) < grad_accum:
                continue
            before, index = {"epoch": epoch, "index": index}, index + grad_accum
            done = index >= per_epoch
            after = {"epoch": epoch + 1, "index": 0} if done else {"epoch": epoch, "index": index}
            yield StepBatch(group, epoch, before, after)
            group = []
            if done:
                break
        epoch, index = epoch + 1, 0


def token_batches(sizes, max_tokens: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> "Batches":
    """This rank's index batches for `epoch`, built by token count from length buckets: examples sorted by
    `sizes` (the padded length each one needs, e.g. max(source, target) tokens) are cut into runs whose padded
    size len(batch) x max(sizes) stays within `max_tokens`, then the batches are shuffled.

    Ties in size are broken by a (seed, epoch) permutation, so batches mix differently every epoch; their
    number is the same for every epoch (it depends on the sorted sizes alone), which keeps the steps per epoch
    fixed and a resumed epoch identical. With several ranks, rank r takes every world-th batch of the
    shuffled list, the remainder dropped so that ranks step together. Arrays throughout (numpy): no Python
    object per example, whatever the corpus size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and sizes.max() > max_tokens:
        raise ValueError(f"an example of {int(sizes.max())} tokens does not fit max_tokens={max_tokens}")
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(sizes), generator=g).numpy() if shuffle else np.arange(len(sizes))
    order = perm[np.argsort(sizes[perm], kind="stable")]   # stable: equal sizes keep the permuted order
    sorted_sizes = sizes[order]
    # greedy cut: a batch from `start` ends before the first k with (k + 1) x sorted_sizes[start + k] > max_tokens
    # (sizes ascend, so the newest example is the longest); k <= max_tokens since every size is >= 1
    bounds, start, n = [0], 0, len(order)
    while start < n:
        window = sorted_sizes[start:start + max_tokens]
        over = np.flatnonzero(np.arange(1, len(window) + 1) * window > max_tokens)
        start += int(over[0]) if len(over) else len(window)
        bounds.append(start)
    bounds = np.array(bounds, dtype=np.int64)
    picks = np.arange(len(bounds) - 1)
    if shuffle:
        picks = torch.randperm(len(picks), generator=g).numpy()
    per_rank = len(picks) // world
    return Batches(order, bounds, picks[rank::world][:per_rank])


class Batches:
    """A list of index batches held as arrays: batch b is order[bounds[p]:bounds[p + 1]] for p = picks[b]."""

    def __init__(self, order: np.ndarray, bounds: np.ndarray, picks: np.ndarray):
        self.order, self.bounds, self.picks = order, bounds, picks

    def __len__(self):
        return len(self.picks)

    def __getitem__(self, b):
        if isinstance(b, slice):
            return Batches(self.order, self.bounds, self.picks[b])
        p = self.picks[b]
        return self.order[self.bounds[p]:self.bounds[p + 1]].tolist()

    def __iter__(self):
        return (self[b] for b in range(len(self)))

    def __eq__(self, other):
        return list(self) == list(other)
