"""The train-split question-type answer prior, the bias every debiasing loss uses."""

from __future__ import annotations

import torch

__all__ = ["question_type_prior"]


def question_type_prior(
    targets: torch.Tensor, question_type_ids: torch.Tensor, num_question_types: int
) -> torch.Tensor:
    """Per question type, the mean soft score of each answer over its training questions.

    Args:
        targets: ``(N, A)`` soft scores of the training questions.
        question_type_ids: ``(N,)`` long, the type of each question.
        num_question_types: number of types (rows of the result).

    Returns:
        ``(num_question_types, A)``; a type with no training question gets a zero row.

    Raises:
        ValueError: for mismatched shapes or ids out of range.
    """
    if targets.dim() != 2 or question_type_ids.shape != (targets.shape[0],):
        raise ValueError(
            f"question_type_prior: targets (N, A) and ids (N,) expected, got "
            f"{tuple(targets.shape)} and {tuple(question_type_ids.shape)}"
        )
    ids = question_type_ids.long()
    if len(ids) and (ids.min() < 0 or ids.max() >= num_question_types):
        raise ValueError(f"question type ids must be in [0, {num_question_types})")
    sums = torch.zeros(num_question_types, targets.shape[1], dtype=torch.float64)
    sums.index_add_(0, ids, targets.double())
    counts = torch.bincount(ids, minlength=num_question_types).clamp(min=1).double()
    return (sums / counts[:, None]).float()
