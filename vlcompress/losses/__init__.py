"""Task losses, one file each, through one contract: ``loss(logits, batch, extras)``.

Every loss is a :class:`VQALoss` registered with ``@register("loss", name)``; debiasing losses
(LMH, PoE, RUBi, LPF) join here and receive the question-type prior through
:class:`LossContext`.
"""

from vlcompress.losses.base import LossContext, VQALoss
from vlcompress.losses.bce import BCELoss, vqa_bce
from vlcompress.losses.ce import SoftCELoss, soft_cross_entropy

__all__ = ["BCELoss", "LossContext", "SoftCELoss", "VQALoss", "soft_cross_entropy", "vqa_bce"]
