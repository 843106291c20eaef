"""LMH: learned-mixin + H (Clark et al., 2019), the binary form used for VQA by seed 000.

Per answer, the question-type prior ``b`` gives a binary bias ``[b, 1 - b]``, smoothed by a
learned ``σ(s)`` (``s`` starts at ``smooth_init``), taken to log space and scaled by a learned
gate ``g = softplus(Linear(pooled))``; it is added to ``[log σ(z), log(1 - σ(z))]`` and the pair
is renormalised. The loss is BCE with the soft targets under the mixed distribution plus
``entropy_weight`` × the entropy of the scaled bias (which stops the gate from switching the
bias off). Unlike the seed's public code, the gate and ``s`` are parameters of the loss and so
are trained. In evaluation only the main logits count (plain BCE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import LossContext, VQALoss
from vlcompress.losses.bce import vqa_bce
from vlcompress.options import check_fields, in_range
from vlcompress.registry import register

__all__ = ["LMHLoss", "LMHOptions", "binary_log_probs"]


def binary_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(B, A) -> (B, A, 2)``: ``[log σ(z), log(1 - σ(z))]`` per answer."""
    return torch.stack([F.logsigmoid(logits), F.logsigmoid(-logits)], dim=-1)


def binary_nll(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE of soft ``targets`` under per-answer binary log-probabilities, summed over answers
    and averaged over the batch (the scale of :func:`~vlcompress.losses.bce.vqa_bce`)."""
    nll = -(targets * log_probs[..., 0] + (1 - targets) * log_probs[..., 1])
    return nll.sum(dim=1).mean()


@dataclass(frozen=True)
class LMHOptions:
    """Options of :class:`LMHLoss`.

    Attributes:
        entropy_weight: weight of the bias-entropy penalty (0.36 in seed 000).
        smooth_init: initial value of the smoothing parameter ``s`` (``σ(s)`` is added to the
            binary bias before the log).
    """

    entropy_weight: float = field(default=0.36, metadata=in_range(0.0))
    smooth_init: float = -1.0

    def __post_init__(self) -> None:
        check_fields(self)


@register("loss", "lmh", options=LMHOptions)
class LMHLoss(VQALoss):
    """Learned-mixin + H: the question-type prior mixed in by a learned gate, with an entropy
    penalty; training only.

    Args:
        options: :class:`LMHOptions`.
    """

    requires = ("question_type_prior", "pooled_dim")

    def __init__(self, options: LMHOptions | None = None) -> None:
        super().__init__()
        self.options = options or LMHOptions()
        self.smooth = nn.Parameter(torch.tensor(float(self.options.smooth_init)))

    def setup(self, context: LossContext) -> None:
        """Build the gate ``Linear(pooled_dim -> 1)``."""
        super().setup(context)
        self.gate = nn.Linear(int(context.pooled_dim), 1)

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """Mixed-in BCE + entropy penalty in training; BCE of the logits in evaluation."""
        if not self.training:
            return vqa_bce(logits, batch.targets)
        b = self.question_type_prior[batch.question_type_id]  # (B, A)
        bias = torch.stack([b, 1 - b], dim=-1) + torch.sigmoid(self.smooth)
        g = F.softplus(self.gate(extras["pooled"]))  # (B, 1)
        scaled = bias.log() * g.unsqueeze(-1)
        mixed = binary_log_probs(logits) + scaled
        mixed = mixed - mixed.logsumexp(dim=-1, keepdim=True)
        loss = binary_nll(mixed, batch.targets)
        if self.options.entropy_weight > 0:
            lp = scaled.log_softmax(dim=-1)
            entropy = -(lp.exp() * lp).sum(dim=-1).mean()
            loss = loss + self.options.entropy_weight * entropy
        return loss
