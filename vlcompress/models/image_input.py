"""What the models that read raw images (ViLT, METER) share: one image or an image pair per
example, the text trimmed to its real length, the pair head's answer count, each checked with a
message that names the fix."""

from __future__ import annotations

import torch

from vlcompress.data.batch import VLBatch

__all__ = ["PAIR_ANSWERS", "check_pair_answers", "image_stack", "trimmed_text"]

PAIR_ANSWERS = 2
"""Outputs of a pair head: False, True."""


def check_pair_answers(model: str, head: str, num_answers: int) -> None:
    """Refuse a pair head over other than True / False.

    Raises:
        ValueError: ``head`` is ``pair`` and ``num_answers`` is not 2.
    """
    if head == "pair" and num_answers != PAIR_ANSWERS:
        raise ValueError(
            f"{model} head: pair answers True / False (2 outputs), but the data has "
            f"{num_answers} answers; use a pair data module (easy_pairs, nlvr2) or "
            "model.options.head: vqa."
        )


def image_stack(
    batch: VLBatch, model: str, head: str, pairs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's pixels as ``(B, I, 3, H, W)`` (``I`` = 1, or 2 for pairs) and their pixel
    masks ``(B, I, H, W)`` (``None``: every pixel real).

    Args:
        batch: pixels ``(B, 3, H, W)`` or pairs ``(B, 2, 3, H, W)`` in [0, 1].
        model, head: for messages.
        pairs: whether the model reads two images per example.

    Raises:
        ValueError: for region features, or pairs given to a single-image head (and the
            reverse).
    """
    visual, mask = batch.visual, batch.visual_mask
    if visual.dim() == 4:
        visual = visual[:, None]
        mask = None if mask is None else mask[:, None]
    if visual.dim() != 5 or visual.shape[2] != 3:
        raise ValueError(
            f"{model} reads images (B, 3, H, W) or image pairs (B, 2, 3, H, W) in [0, 1], not "
            f"visual {tuple(batch.visual.shape)} (region features?); set the data's "
            "visual_features: pixels."
        )
    wanted = 2 if pairs else 1
    if visual.shape[1] != wanted:
        fix = "head: pair" if visual.shape[1] == 2 else "head: vqa"
        raise ValueError(
            f"{model} head: {head} reads {wanted} image(s) per example, the batch has "
            f"{visual.shape[1]}; set model.options.{fix}."
        )
    return visual, mask


def trimmed_text(batch: VLBatch, limit: int, too_long: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The question ids and bool mask without the trailing columns that are padding in every
    question.

    Args:
        batch: the batch.
        limit: the most tokens the model reads.
        too_long: the message when the text is longer, with ``{length}`` for its length.

    Raises:
        ValueError: ``too_long`` formatted, for text longer than ``limit``.
    """
    real = batch.text_mask.any(0).nonzero()
    length = int(real.max()) + 1 if len(real) else 1
    if length > limit:
        raise ValueError(too_long.format(length=length))
    return batch.text_ids[:, :length], batch.text_mask[:, :length].bool()
