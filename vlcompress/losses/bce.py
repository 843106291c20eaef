"""Binary cross-entropy against VQA soft scores (the standard VQA loss)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import VQALoss
from vlcompress.registry import register


def vqa_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with soft scores, summed over answers, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


@register("loss", "bce")
class BCELoss(VQALoss):
    """Binary cross-entropy with soft scores, summed over answers, averaged over the batch."""

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """The loss of ``logits`` against ``batch.targets``."""
        return vqa_bce(logits, batch.targets)
