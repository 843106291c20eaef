"""Answer vocabulary and VQA soft-score targets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from vlcompress.metrics.vqa_eval import normalize_answer, soft_score


class AnswerVocab:
    """The classifier's answers, in output order.

    Args:
        answers: answer strings (already normalised, unique).
    """

    def __init__(self, answers: Sequence[str]) -> None:
        if len(set(answers)) != len(answers):
            raise ValueError("AnswerVocab answers must be unique.")
        self.answers = list(answers)
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    def targets(self, annotator_answers: Sequence[Sequence[str]]) -> torch.Tensor:
        """Soft scores ``(B, A)``: 0/.3/.6/.9/1 for 0/1/2/3/>=4 matching (normalised) answers."""
        out = torch.zeros(len(annotator_answers), len(self.answers))
        for i, answers in enumerate(annotator_answers):
            for ans, n in Counter(normalize_answer(a) for a in answers).items():
                j = self.index.get(ans)
                if j is not None:
                    out[i, j] = soft_score(n)
        return out

    def decode(self, logits: torch.Tensor) -> list[str]:
        """Highest-scoring answer string for each row of ``logits``."""
        return [self.answers[i] for i in logits.argmax(dim=-1).tolist()]
