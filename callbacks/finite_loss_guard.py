"""``FiniteLossGuard``: stop a run at the first NaN/inf loss, before it can spoil any weights."""

from __future__ import annotations

from typing import Any

import torch

from vlcompress.callbacks.base import CompressionCallback
from vlcompress.registry import register

__all__ = ["FiniteLossGuard", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@register("callback", "finite_loss_guard")
class FiniteLossGuard(CompressionCallback):
    """Raise :class:`NonFiniteLossError` naming the step when the training loss is not finite.

    The check runs before ``backward``, so the optimiser never applies a NaN update and no
    checkpoint is written after it: the last good checkpoint stays on disk, and the message
    names it. The decision is reduced across DDP ranks (``reduce_boolean_decision``), so every
    rank stops at the same step, even when only one rank's batch produced the NaN.

    It checks every training loss: skipping some would let a NaN update through, and the check
    costs one all-reduce of a flag per step (nothing on one process). Its state (how many
    losses it checked) is kept in checkpoints so the count in :meth:`report` survives a resume.

    Raises:
        NonFiniteLossError: from ``on_before_backward``, on every rank, at the first step whose
            loss is NaN or infinite on any rank.

    Example::

        trainer = L.Trainer(callbacks=[FiniteLossGuard()])
        trainer.fit(model)  # NonFiniteLossError: non-finite training loss (nan) at global step 8 ...
    """

    requires_anatomy = False

    def __init__(self) -> None:
        super().__init__(seed=0)  # makes no random decision: no seed to agree on
        self._batch_idx = 0
        self.checked = 0

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch index for the error message."""
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        """Check the loss on every rank; raise on all of them if any saw a non-finite value."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.all_ranks(finite):
            self.checked += 1
            return
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        value = float(loss.detach()) if loss.numel() == 1 else "with non-finite elements"
        what = f"({value})" if not finite else f"on another rank (this rank's: {value})"
        advice = self.advise(
            lightning=(
                "Try a lower learning rate in your optimiser, gradient clipping "
                "(Trainer(gradient_clip_val=1.0)), or precision='32-true' if you train in "
                "half precision."
            ),
            vlcompress="Try a lower optim.lr or optim.grad_clip > 0.",
        )
        raise NonFiniteLossError(
            f"non-finite training loss {what} at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {self._batch_idx}); the run stops here. "
            f"Last good checkpoint: {ckpt}. {advice}"
        )

    def state(self) -> dict[str, Any]:
        """``{"checked": number of finite losses checked so far}``."""
        return {"checked": self.checked}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue the count of a resumed run."""
        self.checked = int(state.get("checked", 0))

    def report(self) -> dict[str, Any]:
        """``{"checked_losses": n}``: every one of them was finite (or the run raised)."""
        return {"checked_losses": self.checked}

    def report_rows(self) -> list[tuple[str, str]]:
        """One row: how many training losses were checked."""
        return [("finite losses checked", str(self.checked))]
