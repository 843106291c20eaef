"""The loss contract: ``loss(logits, batch, extras) -> scalar``, with optional parameters.

A task loss is an ``nn.Module`` (so it may own parameters, such as LMH's gate, that the task
puts into its optimiser and its checkpoints). Before training, the task calls
:meth:`VQALoss.setup` once with a :class:`LossContext`: the answer count, the train-split
question-type answer prior from the data module, and the sizes of the model's pooled features
and question representation. Bias terms act only in training: in ``eval()`` mode a loss must
score the main logits alone.

Extras a model may return (``model(batch, return_extras=True) -> (logits, extras)``):

- ``"pooled"``: ``(B, pooled_dim)``, the fused features the task head reads (LMH's gate).
- ``"question"``: ``(B, question_dim)``, the model's question-only representation, before any
  fusion with the image (MCAN: the AttFlat-reduced question vector); the original RUBi's
  question-only branch reads it (detached).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlcompress.data.batch import VLBatch

__all__ = ["LossContext", "VQALoss"]


@dataclass
class LossContext:
    """What a loss may need to know before training.

    Attributes:
        num_answers: classifier outputs.
        question_types: the data module's question types, in prior-row order.
        question_type_prior: ``(len(question_types), num_answers)``: per question type, the mean
            soft score of each answer over the training questions of that type; ``None`` when
            the data module has no question types.
        pooled_dim: size of the model's pooled features (``extras["pooled"]``), if it has any.
        question_dim: size of the model's question representation (``extras["question"]``),
            if it has one.
    """

    num_answers: int
    question_types: list[str] = field(default_factory=list)
    question_type_prior: torch.Tensor | None = None
    pooled_dim: int | None = None
    question_dim: int | None = None


class VQALoss(nn.Module):
    """Base of every task loss: ``loss(logits, batch, extras) -> scalar``.

    ``forward(logits, batch, extras)`` receives the main answer logits ``(B, A)``, the
    :class:`~vlcompress.data.VLBatch` (soft ``targets``, ``question_type_id`` rows of the prior)
    and the model's extra outputs (``extras["pooled"]``: ``(B, pooled_dim)``,
    ``extras["question"]``: ``(B, question_dim)``, when the model has them; see the module); it
    returns a scalar. In ``eval()`` mode it must score the main logits alone.

    Subclasses implement :meth:`forward` and, when they need the prior or build parameters
    whose size depends on the model, :meth:`setup` (calling ``super().setup(context)`` first).
    ``requires`` names the context a loss cannot work without (checked by :meth:`setup`, so a
    bad combination fails before training). The base keeps the prior as a non-persistent
    buffer ``question_type_prior``, so it follows the module to the GPU.

    Example::

        loss = build("loss", "bce")
        loss.setup(LossContext(num_answers=13))
        value = loss(logits, batch, {})
    """

    requires: tuple[str, ...] = ()

    def setup(self, context: LossContext) -> None:
        """Receive the context (once, before the optimiser is built).

        Raises:
            ValueError: when the context lacks something listed in ``requires``.
        """
        missing = [r for r in self.requires if getattr(context, r, None) is None]
        if missing:
            raise ValueError(
                f"the {type(self).__name__} loss needs {missing}, which this data module / model "
                "does not provide (the prior comes from a data module with question types; "
                "pooled features / question features from a model with returns_extras whose "
                "extras hold 'pooled' / 'question', and whose pooled_dim / question_dim say "
                "their sizes)."
            )
        self.context = context
        if context.question_type_prior is not None:
            prior = context.question_type_prior.detach().float()
            self.register_buffer("question_type_prior", prior, persistent=False)

    def forward(self, logits: torch.Tensor, batch: VLBatch, extras: dict[str, Any]) -> torch.Tensor:
        """The loss of ``logits`` for ``batch`` (see the class docstring)."""
        raise NotImplementedError
