"""Task losses over answer logits and soft VQA targets (debiasing losses join here)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def vqa_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with soft scores, summed over answers, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / logits.shape[0]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the soft scores normalised to a distribution."""
    dist = targets / targets.sum(dim=-1, keepdim=True).clamp(min=1e-12)
    return -(dist * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "bce": vqa_bce,
    "ce": soft_cross_entropy,
}
"""Registered losses: ``name -> fn(logits, targets)``."""

__all__ = ["LOSSES", "soft_cross_entropy", "vqa_bce"]
