"""PoE: product of experts with the question-type prior (Clark et al., 2019), binary form.

Per answer, ``[log σ(z), log(1 - σ(z))] + log [b, 1 - b]`` is renormalised and scored with the
soft targets; in evaluation only the main logits count (plain BCE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import VQALoss
from vlcompress.losses.bce import vqa_bce
from vlcompress.losses.lmh import binary_log_probs, binary_nll
from vlcompress.options import check_fields, in_range
from vlcompress.registry import register

__all__ = ["PoELoss", "PoEOptions"]


@dataclass(frozen=True)
class PoEOptions:
    """Options of :class:`PoELoss`.

    Attributes:
        eps: floor of the prior before the log (a prior of exactly 0 or 1 would be infinite).
    """

    eps: float = field(default=1e-6, metadata=in_range(0.0, 0.5, lo_open=True))

    def __post_init__(self) -> None:
        check_fields(self)


@register("loss", "poe", options=PoEOptions)
class PoELoss(VQALoss):
    """Product of experts with the question-type prior; training only.

    Args:
        options: :class:`PoEOptions`.
    """

    requires = ("question_type_prior",)

    def __init__(self, options: PoEOptions | None = None) -> None:
        super().__init__()
        self.options = options or PoEOptions()

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """BCE under the product with the prior in training; BCE of the logits in evaluation."""
        if not self.training:
            return vqa_bce(logits, batch.targets)
        b = self.question_type_prior[batch.question_type_id].clamp(
            self.options.eps, 1 - self.options.eps
        )
        mixed = binary_log_probs(logits) + torch.stack([b, 1 - b], dim=-1).log()
        mixed = mixed - mixed.logsumexp(dim=-1, keepdim=True)
        return binary_nll(mixed, batch.targets)
