"""``EpochShuffleSampler``: the shuffling every benchmark uses, resumable exactly."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochShuffleSampler"]


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation derived from ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed from a checkpoint sees
    exactly the batches the uninterrupted run would have seen.

    Args:
        n: dataset size.
        seed: the run's seed.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())
