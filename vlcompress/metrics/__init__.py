"""Metrics: the official VQA accuracy and its answer normalisation; the blind-model check."""

from vlcompress.metrics.blind import BLIND_MARGIN, blind_check, blind_text
from vlcompress.metrics.vqa_accuracy import ANSWER_TYPES, VQAAccuracy
from vlcompress.metrics.vqa_eval import answer_accuracy, normalize_answer, soft_score

__all__ = [
    "ANSWER_TYPES",
    "BLIND_MARGIN",
    "VQAAccuracy",
    "answer_accuracy",
    "blind_check",
    "blind_text",
    "normalize_answer",
    "soft_score",
]
