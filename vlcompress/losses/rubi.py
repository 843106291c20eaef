"""RUBi (Cadene et al., NeurIPS 2019) in two variants, chosen by ``variant``.

``simplified`` (the default; seed 000's form): the logits are masked by the sigmoid of the
question-type prior before a soft cross-entropy (``CE(z · σ(b))``), so answers the prior favours
are learned less from the question alone.

``original`` (the paper's and ``cdancette/rubi.bootstrap.pytorch``'s form): a question-only
branch, an MLP ``c1`` on the model's question representation (``extras["question"]``, detached
so that the branch never trains the question encoder), gives ``q = c1(question)``; the training
logits are ``z · σ(q)`` and the loss is ``CE(z · σ(q)) + question_loss_weight · CE(c2(q))``,
where ``c2`` is a final ``Linear(answers -> answers)`` (``end_linear``; the reference's
``end_classif``). The branch belongs to the loss, so the task trains it with the model.
The reference uses hard cross-entropy with a sampled answer; we use the soft cross-entropy of
the soft targets, as the simplified variant does.

In evaluation both variants return the plain soft cross-entropy of the logits ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import LossContext, VQALoss
from vlcompress.losses.ce import soft_cross_entropy
from vlcompress.options import check_fields, choices, in_range
from vlcompress.registry import register

__all__ = ["RUBiLoss", "RUBiOptions"]


@dataclass(frozen=True)
class RUBiOptions:
    """Options of :class:`RUBiLoss`.

    Attributes:
        variant: ``simplified`` (mask by the question-type prior) or ``original`` (a learned
            question-only branch; needs a model whose extras hold ``question``).
        question_loss_weight: weight of the question-only branch's own loss (``original``).
        hidden_dims: hidden sizes of the question-only MLP ``c1`` (``original``; the
            reference uses 1024, 1024); its output size is the answer count.
        end_linear: add the final ``Linear(answers -> answers)`` ``c2`` before the branch's
            own loss (``original``; the reference's ``end_classif``, on by default).
    """

    variant: str = field(default="simplified", metadata=choices("simplified", "original"))
    question_loss_weight: float = field(default=1.0, metadata=in_range(0.0))
    hidden_dims: tuple[int, ...] = (1024, 1024)
    end_linear: bool = True

    def __post_init__(self) -> None:
        check_fields(self)
        if any(int(d) < 1 for d in self.hidden_dims):
            raise ValueError(
                f"RUBiOptions: hidden_dims must be positive sizes, got {list(self.hidden_dims)}; "
                "use e.g. [1024, 1024], or [] for a single linear layer."
            )


@register("loss", "rubi", options=RUBiOptions)
class RUBiLoss(VQALoss):
    """RUBi: ``simplified`` = soft CE of ``z · σ(prior)``; ``original`` = soft CE of
    ``z · σ(q)`` plus the question-only branch's soft CE (training only; see the module).

    Args:
        options: :class:`RUBiOptions`.

    Example::

        loss = build("loss", "rubi", {"variant": "original"})
        loss.setup(LossContext(num_answers=13, question_dim=256))
        value = loss(logits, batch, {"question": question_features})
    """

    def __init__(self, options: RUBiOptions | None = None) -> None:
        super().__init__()
        self.options = options or RUBiOptions()
        self.original = self.options.variant == "original"
        self.requires = ("question_dim",) if self.original else ("question_type_prior",)

    def setup(self, context: LossContext) -> None:
        """Build the question-only branch (``original``) once the sizes are known."""
        super().setup(context)
        if not self.original:
            return
        dims = [int(context.question_dim), *map(int, self.options.hidden_dims)]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], context.num_answers))
        self.question_branch = nn.Sequential(*layers)
        self.question_head = (
            nn.Linear(context.num_answers, context.num_answers)
            if self.options.end_linear
            else nn.Identity()
        )

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """The training loss of the chosen variant; soft CE of the logits in evaluation.

        Raises:
            KeyError: ``original`` in training without ``extras["question"]``.
        """
        if not self.training:
            return soft_cross_entropy(logits, batch.targets)
        if not self.original:
            masked = logits * torch.sigmoid(self.question_type_prior[batch.question_type_id])
            return soft_cross_entropy(masked, batch.targets)
        if "question" not in extras:
            raise KeyError(
                "rubi (variant original) needs extras['question'], the model's question "
                f"representation; the model returned only {sorted(extras)}. Use a model that "
                "exposes it (e.g. MCAN) or variant=simplified."
            )
        q = self.question_branch(extras["question"].detach())  # never trains the encoder
        loss = soft_cross_entropy(logits * torch.sigmoid(q), batch.targets)
        w = self.options.question_loss_weight
        if w > 0:
            loss = loss + w * soft_cross_entropy(self.question_head(q), batch.targets)
        return loss
