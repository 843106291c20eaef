"""LPF: loss re-scaling by the prior of the ground truth (Liang et al., 2021), as seed 000.

Each question's soft cross-entropy is weighted by ``(1 - p_gt)^γ``, where ``p_gt`` is the
probability its question type's prior gives to its (soft) ground truth: questions the prior
already answers count little. In evaluation the plain soft cross-entropy is returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import VQALoss
from vlcompress.losses.ce import soft_cross_entropy
from vlcompress.options import check_fields, in_range
from vlcompress.registry import register

__all__ = ["LPFLoss", "LPFOptions"]


@dataclass(frozen=True)
class LPFOptions:
    """Options of :class:`LPFLoss`.

    Attributes:
        gamma: exponent of ``1 - p_gt`` (5 in seed 000; 0 gives the plain soft cross-entropy).
    """

    gamma: float = field(default=5.0, metadata=in_range(0.0))

    def __post_init__(self) -> None:
        check_fields(self)


@register("loss", "lpf", options=LPFOptions)
class LPFLoss(VQALoss):
    """Soft cross-entropy re-weighted by ``(1 - prior[ground truth])^γ``; training only.

    Args:
        options: :class:`LPFOptions`.
    """

    requires = ("question_type_prior",)

    def __init__(self, options: LPFOptions | None = None) -> None:
        super().__init__()
        self.options = options or LPFOptions()

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """Weighted soft cross-entropy in training; soft cross-entropy in evaluation."""
        if not self.training:
            return soft_cross_entropy(logits, batch.targets)
        t = batch.targets
        dist = t / t.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        prior = self.question_type_prior[batch.question_type_id]
        prior = prior / prior.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        p_gt = (dist * prior).sum(dim=-1).clamp(0.0, 1.0)
        ce = -(dist * logits.log_softmax(dim=-1)).sum(dim=-1)
        return ((1 - p_gt).pow(self.options.gamma) * ce).mean()
