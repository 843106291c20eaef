"""When to prune and how much: one-shot, or iterative at step level (constant, linear, cubic).

Every schedule is a function of the progress ``p = (step - start) / (end - start)`` at the
pruning events ``start, start + every, ..., end`` (``end`` is always an event):

* ``one_shot`` — one event at ``start`` with the final sparsity;
* ``linear`` — ``s_f * p``;
* ``cubic`` — Zhu & Gupta (2017): ``s_f * (1 - (1 - p) ** 3)`` (prune fast early, slowly late);
* ``constant`` — the same fraction of the *remaining* weights at every event:
  ``1 - (1 - s_f) ** p`` (iterative magnitude pruning, as in the lottery-ticket experiments).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SCHEDULES", "PruningSchedule"]

SCHEDULES = ("one_shot", "constant", "linear", "cubic")


@dataclass(frozen=True)
class PruningSchedule:
    """Pruning events and the fraction of the final sparsity reached at each.

    Args:
        kind: one of :data:`SCHEDULES`.
        start_step: first event (global step, before that step's batch).
        end_step: last event (ignored for ``one_shot``).
        every: steps between events.
    """

    kind: str = "one_shot"
    start_step: int = 0
    end_step: int = 0
    every: int = 100

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}; got {self.kind!r}")
        if self.start_step < 0 or self.every < 1:
            raise ValueError(
                f"start_step must be >= 0 and every >= 1; got {self.start_step}, {self.every}"
            )
        if self.kind != "one_shot" and self.end_step < self.start_step:
            raise ValueError(
                f"end_step ({self.end_step}) must be >= start_step ({self.start_step}) for the "
                f"{self.kind!r} schedule"
            )

    def events(self) -> list[int]:
        """The global steps at which masks are recomputed, in order."""
        if self.kind == "one_shot":
            return [self.start_step]
        steps = list(range(self.start_step, self.end_step + 1, self.every))
        if steps[-1] != self.end_step:
            steps.append(self.end_step)
        return steps

    def progress(self, step: int) -> float:
        """``p`` in ``[0, 1]`` at ``step``."""
        if self.kind == "one_shot" or self.end_step == self.start_step:
            return 1.0 if step >= self.start_step else 0.0
        p = (step - self.start_step) / (self.end_step - self.start_step)
        return min(1.0, max(0.0, p))

    def sparsity_at(self, step: int, final: float) -> float:
        """The sparsity (fraction zeroed) to hold from the event at ``step`` on."""
        p = self.progress(step)
        if self.kind in ("one_shot", "linear"):
            return final * p
        if self.kind == "cubic":
            return final * (1.0 - (1.0 - p) ** 3)
        return 1.0 - (1.0 - final) ** p  # constant: same share of the remaining weights
