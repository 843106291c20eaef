"""Cross-entropy against the soft scores normalised to a distribution."""

from __future__ import annotations

from typing import Any

import torch

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import VQALoss
from vlcompress.registry import register


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the soft scores normalised to a distribution."""
    dist = targets / targets.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return -(dist * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


@register("loss", "ce")
class SoftCELoss(VQALoss):
    """Cross-entropy against the soft scores normalised to a distribution."""

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """The loss of ``logits`` against ``batch.targets``."""
        return soft_cross_entropy(logits, batch.targets)
