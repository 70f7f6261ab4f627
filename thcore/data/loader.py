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
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
