"""A resumable, distributed-aware sampler: epoch ``e`` is a permutation seeded by (seed, e)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices; rank ``r`` of ``world`` takes every world-th batch slot.

    The order depends only on ``(seed, epoch)``, so a resumed run can start at batch
    ``start_batch`` of an epoch and see exactly the batches the uninterrupted run would have.
    Incomplete final batches are dropped (BatchNorm dislikes tiny batches).
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True) -> None:
        if dataset_size < batch_size * world_size:
            raise ValueError(
                f"dataset has {dataset_size} samples, fewer than one batch ({batch_size} x {world_size} processes)"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.start_batch = 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        per_step = self.batch_size * self.world_size
        for batch in range(self.start_batch, self.batches_per_epoch):
            chunk = order[batch * per_step:(batch + 1) * per_step]
            yield chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
