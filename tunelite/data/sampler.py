"""The order samples are visited in, derived from (seed, epoch) alone.

A resumed run must see exactly the batches the uninterrupted run would have seen. Deriving each
epoch's permutation from the seed and the epoch number, instead of from a generator's running
state, makes that a matter of skipping the batches already done. Ranks of a distributed run
take interleaved slices of the same permutation, as torch's DistributedSampler does, so the k-th
batches of N ranks together hold the samples of a single process's k-th batch N times as large.
"""

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(
        self, num_samples: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Begin `epoch` at this rank's `start`-th sample (0 for a fresh epoch)."""
        self.epoch, self.start = epoch, start

    def indices(self, epoch: int | None = None) -> list[int]:
        """This rank's dataset indices for a whole epoch, in visiting order (the current epoch by default)."""
        epoch = self.epoch if epoch is None else epoch
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.num_samples)
        usable = self.num_samples - self.num_samples % self.world_size
        return order[self.rank:usable:self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    @property
    def epoch_length(self) -> int:
        """Samples this rank visits in a whole epoch."""
        return self.num_samples // self.world_size

    def __len__(self) -> int:
        return self.epoch_length - self.start
