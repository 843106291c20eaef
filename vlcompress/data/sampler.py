"""Samplers every benchmark uses: epoch-seeded shuffling, sharded across DDP ranks, resumable
in the middle of an epoch, and evaluation shards that count every question exactly once.

Both derive from ``torch.utils.data.DistributedSampler`` so that Lightning uses them as they are
(it would otherwise wrap them in its own distributed sampler, which pads evaluation sets with
repeated examples and reshuffles training data on top of ours).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

__all__ = ["EpochShuffleSampler", "ShardSampler", "balanced_weights"]


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with a permutation derived from ``(seed, epoch)`` only, sharded across ranks.

    Every rank draws the same permutation; rank ``r`` of ``w`` takes every ``w``-th index from
    position ``r`` (the permutation is padded by wrapping so that every rank gets the same
    number of batches, as DDP training requires). Lightning calls :meth:`set_epoch` before
    each epoch, so a run resumed from a checkpoint sees exactly the batches the uninterrupted
    run would have seen. ``position`` (called when an epoch's iteration starts) says how many
    of this rank's indices were already consumed in the epoch: a run resumed in the middle of
    an epoch continues with the next batch.

    With ``weights``, an epoch is ``n`` draws with replacement in proportion to them (seeded by
    ``(seed, epoch)`` as well, so resuming and sharding work the same way), instead of a
    permutation.

    Args:
        n: dataset size.
        seed: the run's seed.
        rank: this process's global rank.
        world_size: number of processes.
        position: ``() -> int``, indices of this epoch already consumed (``None``: 0).
        weights: ``(n,)`` non-negative sampling weights (``None``: every example once).
    """

    def __init__(
        self,
        n: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        position: Callable[[], int] | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (n,) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
                raise ValueError(
                    f"sampling weights must be {n} non-negative numbers with a positive sum, "
                    f"got shape {tuple(weights.shape)}"
                )
        super().__init__(_Sized(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.n, self.position, self.weights = n, position, weights

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.multinomial(self.weights, self.n, replacement=True, generator=g)
        if self.num_replicas > 1:
            total = len(self) * self.num_replicas
            perm = torch.cat([perm, perm[: total - self.n]])[self.rank :: self.num_replicas]
        skip = int(self.position()) if self.position is not None else 0
        return iter(perm[max(0, skip) :].tolist())


class ShardSampler(DistributedSampler):
    """In-order evaluation shard of rank ``r``: indices ``r, r + w, r + 2w, ...`` — no padding,
    so a metric reduced over the ranks counts every example exactly once (Lightning's
    ``DistributedSampler`` pads with repeated examples instead). Ranks may get one batch more
    or less: evaluation must not synchronise per step (reduce in ``compute``).

    Args:
        n: dataset size.
        rank: this process's global rank.
        world_size: number of processes.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        super().__init__(_Sized(n), num_replicas=world_size, rank=rank, shuffle=False)
        self.n = n

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))


def balanced_weights(groups: Sequence[Hashable], answers: Sequence[Hashable]) -> torch.Tensor:
    """Sampling weights under which, within each group (e.g. a question template), every answer
    it has is equally likely, while each group keeps its share of the data.

    Row ``i`` of group ``g`` with answer ``a`` gets ``count(g) / (answers(g) * count(g, a))``
    (the weights sum to the number of rows). Easy-VQA's "is there a <colour> shape?" is answered
    "yes" 12% of the time; drawn with these weights, half the time.

    Raises:
        ValueError: when the two sequences differ in length or are empty.
    """
    if len(groups) != len(answers) or not len(groups):
        raise ValueError(
            f"balanced_weights needs one group per answer, got {len(groups)} groups and "
            f"{len(answers)} answers"
        )
    per_group = Counter(groups)
    per_pair = Counter(zip(groups, answers, strict=True))
    n_answers = Counter(g for g, _ in per_pair)
    return torch.tensor(
        [
            per_group[g] / (n_answers[g] * per_pair[(g, a)])
            for g, a in zip(groups, answers, strict=True)
        ],
        dtype=torch.float64,
    )
