"""RUBi, in seed 000's simplified form: the logits are masked by the sigmoid of the
question-type prior before a soft cross-entropy (``CE(z · σ(b))``), so answers the prior favours
are learned less from the question alone. The original RUBi (a question-only branch with its
own loss) needs question features from the model and is not implemented here. In evaluation
the plain soft cross-entropy of the logits is returned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import VQALoss
from vlcompress.losses.ce import soft_cross_entropy
from vlcompress.registry import register

__all__ = ["RUBiLoss", "RUBiOptions"]


@dataclass(frozen=True)
class RUBiOptions:
    """Options of :class:`RUBiLoss` (none yet)."""


@register("loss", "rubi", options=RUBiOptions)
class RUBiLoss(VQALoss):
    """Soft cross-entropy of ``z · σ(prior)`` in training (seed 000's simplified RUBi).

    Args:
        options: :class:`RUBiOptions`.
    """

    requires = ("question_type_prior",)

    def __init__(self, options: RUBiOptions | None = None) -> None:
        super().__init__()
        self.options = options or RUBiOptions()

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """Soft CE of the prior-masked logits in training; of the logits in evaluation."""
        if self.training:
            logits = logits * torch.sigmoid(self.question_type_prior[batch.question_type_id])
        return soft_cross_entropy(logits, batch.targets)
