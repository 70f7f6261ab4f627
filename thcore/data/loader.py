"""Deterministic, resumable batching: the order of epoch `e` is a function of (seed, e) alone, so a run
resumed at micro-batch `start` of an epoch sees exactly the batches the uninterrupted run saw."""
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


def token_batches(sizes: list[int], max_tokens: int, epoch: int, seed: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's index batches for `epoch`, built by token count: examples sorted by `sizes` (the padded
    length each one needs, e.g. max(source, target) tokens) are cut into runs whose padded size
    len(batch) x max(sizes) stays within `max_tokens`, then the batches are shuffled.

    Ties in size are broken by a (seed, epoch) permutation, so batches mix differently every epoch; their
    number is the same for every epoch (it depends on the sorted sizes alone), which keeps the steps per epoch
    fixed and a resumed epoch identical. With several ranks, rank r takes every world-th batch of the
    shuffled list, the remainder dropped so that ranks step together."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(sizes), generator=g).tolist() if shuffle else list(range(len(sizes)))
    order = sorted(perm, key=lambda i: sizes[i])   # stable: equal sizes keep the permuted order
    batches, cur, longest = [], [], 0
    for i in order:
        if sizes[i] > max_tokens:
            raise ValueError(f"an example of {sizes[i]} tokens does not fit max_tokens={max_tokens}")
        if cur and (len(cur) + 1) * max(longest, sizes[i]) > max_tokens:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, sizes[i])
    if cur:
        batches.append(cur)
    if shuffle:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    per_rank = len(batches) // world
    return batches[rank::world][:per_rank]
