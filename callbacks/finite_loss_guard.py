"""``FiniteLossGuard``: stop a run at the first NaN/inf loss, before it can spoil any weights."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` naming the step when the loss is not finite.

    The check runs before ``backward``, so the optimiser never applies a NaN update and no
    checkpoint is written after it: the last good checkpoint stays on disk. The decision is
    reduced across DDP ranks, so every rank stops at the same step.

    Example::

        trainer = L.Trainer(callbacks=[FiniteLossGuard()])
    """

    def __init__(self) -> None:
        self._batch_idx = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch index for the error message."""
        self._batch_idx = batch_idx

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """Check the loss on every rank; raise on all of them if any saw a non-finite value."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none written yet"
        raise NonFiniteLossError(
            f"non-finite training loss ({float(loss.detach())}) at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {self._batch_idx}); the run stops here. "
            f"Last good checkpoint: {ckpt}. Try a lower optim.lr or optim.grad_clip > 0."
        )
