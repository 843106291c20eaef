"""The bandit that chooses which arms (layers, or stream halves) to skip (seed 002, DAS).

Each arm ``i`` has a gate ``g_i`` (0 at the start) and a probability ``p_i = sigmoid(g_i)``
of being skipped. Training draws ``skip`` distinct arms in proportion to ``p``
(:meth:`SkipGates.draw`); every so often a few distinct skip sets are scored without gradient
(:meth:`SkipGates.probe_sets`) and the gates move towards the sets whose loss was lowest
(:meth:`SkipGates.update`): with rewards ``r_k = exp(-loss_k)`` and their mean ``r̄``, for each
probed set ``k`` and each arm ``i`` in it, ``g_i += lr (r_k - r̄) p_i (1 - p_i)``, ``p`` taken
before the update. After the search, the arms with the highest gates are skipped
(:meth:`SkipGates.top`). Pure torch; the Lightning glue is the ``ArchitectureSkipping``
callback. Every random draw takes a ``torch.Generator``, so that ranks seeded alike draw alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SkipGates"]


class SkipGates:
    """Gates over ``arms`` for choosing ``skip`` of them.

    Args:
        arms: the arms' names (layers or stream halves), in a fixed order.
        skip: how many arms are skipped together.
        lr: step of the gate update (1.0 in the seed).

    Raises:
        ValueError: for no arms, ``skip`` outside ``1 .. len(arms) - 1`` or a non-positive
            ``lr``.

    Example::

        gates = SkipGates(["encoder.layer.0", ..., "encoder.layer.11"], skip=1)
        g = torch.Generator().manual_seed(0)
        train_set = gates.draw(g)                # arms to skip in this training step
        sets = gates.probe_sets(3, g)            # score each without gradient ...
        gates.update(sets, [loss_0, loss_1, loss_2])
        gates.top()                              # the arms to skip after the search
    """

    def __init__(self, arms: Sequence[str], skip: int, lr: float = 1.0) -> None:
        arms = list(arms)
        if not arms:
            raise ValueError("SkipGates needs at least one arm.")
        if len(set(arms)) != len(arms):
            raise ValueError(f"arm names must be distinct, got {arms}.")
        if not 1 <= skip < len(arms):
            raise ValueError(
                f"skip must be between 1 and {len(arms) - 1} (there are {len(arms)} arms), "
                f"got {skip}."
            )
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        self.arms, self.skip, self.lr = arms, skip, float(lr)
        self.gates = torch.zeros(len(arms), dtype=torch.float64)
        self.history: list[list[float]] = [self.gates.tolist()]
        self.updates = 0

    # ------------------------------------------------------------------ policy
    def probs(self) -> torch.Tensor:
        """``sigmoid(gates)``: each arm's weight in the draws."""
        return torch.sigmoid(self.gates)

    def draw(self, generator: torch.Generator) -> tuple[int, ...]:
        """``skip`` distinct arms drawn in proportion to :meth:`probs` without replacement
        (a sequential weighted draw, as ``torch.multinomial``), sorted."""
        picked = torch.multinomial(self.probs(), self.skip, replacement=False, generator=generator)
        return tuple(sorted(picked.tolist()))

    def probe_sets(self, n: int, generator: torch.Generator) -> list[tuple[int, ...]]:
        """``n`` distinct skip sets drawn as :meth:`draw` (all possible sets when there are
        fewer than ``n``).

        Raises:
            ValueError: for ``n < 2`` (one set has no baseline to compare with).
        """
        if n < 2:
            raise ValueError(f"probe at least 2 skip sets (their mean is the baseline), got {n}.")
        n = min(n, math.comb(len(self.arms), self.skip))
        sets: list[tuple[int, ...]] = []
        while len(sets) < n:
            s = self.draw(generator)
            if s not in sets:
                sets.append(s)
        return sets

    def update(
        self, sets: Sequence[Sequence[int]], losses: Sequence[float] | torch.Tensor
    ) -> list[float]:
        """Move the gates by the rewards ``exp(-loss)`` of the probed ``sets``.

        Returns:
            The rewards.

        Raises:
            ValueError: for a different number of sets and losses, or a loss that is not
                finite.
        """
        losses = [float(x) for x in losses]
        if len(losses) != len(sets):
            raise ValueError(f"{len(sets)} probed sets but {len(losses)} losses.")
        if not all(math.isfinite(x) for x in losses):
            raise ValueError(f"probe losses must be finite, got {losses}.")
        rewards = [math.exp(-x) for x in losses]
        baseline = sum(rewards) / len(rewards)
        p = self.probs()
        step = torch.zeros_like(self.gates)
        for s, r in zip(sets, rewards):
            for i in s:
                step[i] += self.lr * (r - baseline) * p[i] * (1 - p[i])
        self.gates += step
        self.updates += 1
        self.history.append(self.gates.tolist())
        return rewards

    def top(self, k: int | None = None) -> list[str]:
        """The ``k`` (default ``skip``) arms with the highest gates: the ones to skip (ties go
        to the earlier arm)."""
        return self._ranked(k, descending=True)

    def bottom(self, k: int | None = None) -> list[str]:
        """The ``k`` (default ``skip``) arms with the lowest gates (a control for :meth:`top`)."""
        return self._ranked(k, descending=False)

    def _ranked(self, k: int | None, descending: bool) -> list[str]:
        k = self.skip if k is None else k
        order = sorted(
            range(len(self.arms)),
            key=lambda i: (-self.gates[i].item() if descending else self.gates[i].item(), i),
        )
        return [self.arms[i] for i in sorted(order[:k])]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed search needs (gates, their history, the update count)."""
        return {
            "arms": list(self.arms),
            "skip": self.skip,
            "lr": self.lr,
            "gates": self.gates.tolist(),
            "history": [list(h) for h in self.history],
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state_dict`.

        Raises:
            ValueError: when the checkpoint's arms or ``skip`` differ from these.
        """
        if list(state["arms"]) != self.arms or int(state["skip"]) != self.skip:
            raise ValueError(
                f"the checkpoint's skipping search is over arms {state['arms']} with skip "
                f"{state['skip']}, this one over {self.arms} with skip {self.skip}; resume "
                "with the same model and skip."
            )
        self.gates = torch.tensor(state["gates"], dtype=torch.float64)
        self.history = [list(h) for h in state["history"]]
        self.updates = int(state["updates"])
        self.lr = float(state.get("lr", self.lr))
