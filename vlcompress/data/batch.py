"""``VLBatch``: the one batch type every VL model and task in vlcompress consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VLBatch:
    """A batch of vision-language examples.

    Attributes:
        text_ids: token ids ``(B, T)``, 0 is padding.
        text_mask: ``(B, T)`` bool, True where a real token is.
        visual: region features ``(B, N, D)`` or pixels ``(B, 3, H, W)`` (float).
        visual_mask: ``(B, N)`` bool, True where a real region is; ``None`` when all are real
            (always ``None`` for pixels).
        boxes: ``(B, N, 4)`` normalised ``x1, y1, x2, y2`` region boxes, or ``None``.
        targets: ``(B, A)`` soft answer scores (VQA targets), or ``None`` at inference.
        question_id: ``(B,)`` long.
        question_type: question-type string per example.
        question_type_id: ``(B,)`` long, index of the question type in the data module's
            ``question_types`` (the row of the question-type prior), or ``None``.
        answer_type: answer-type string per example.
        answers: the annotators' answer strings per example (for the official metric).
    """

    text_ids: torch.Tensor
    text_mask: torch.Tensor
    visual: torch.Tensor
    visual_mask: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    question_id: torch.Tensor | None = None
    question_type: list[str] = field(default_factory=list)
    answer_type: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    question_type_id: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.text_ids.shape[0])

    @property
    def is_pixels(self) -> bool:
        """True when ``visual`` holds images rather than region features."""
        return self.visual.dim() == 4
