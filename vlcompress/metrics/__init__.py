"""Metrics: the official VQA accuracy and its answer normalisation."""

from vlcompress.metrics.vqa_accuracy import ANSWER_TYPES, VQAAccuracy
from vlcompress.metrics.vqa_eval import answer_accuracy, normalize_answer, soft_score

__all__ = ["ANSWER_TYPES", "VQAAccuracy", "answer_accuracy", "normalize_answer", "soft_score"]
