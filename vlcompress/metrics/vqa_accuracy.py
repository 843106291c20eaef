"""``VQAAccuracy``: the official VQA evaluation as a torchmetrics ``Metric`` (DDP-correct)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics import Metric

from vlcompress.metrics.vqa_eval import answer_accuracy, normalize_answer

ANSWER_TYPES: tuple[str, ...] = ("yes/no", "number", "other")


class VQAAccuracy(Metric):
    """Official VQA accuracy, overall and broken down by answer type and question type.

    Every state is a sum, so the metric reduces exactly across DDP ranks. Breakdown categories
    must be declared up front (the data module knows them), which keeps the state layout
    identical on every rank.

    With ``answers`` (the answer vocabulary) and question types, :meth:`breakdown` also gives
    the *balanced* accuracy: per question type the mean over ground-truth (majority) answers of
    the accuracy on that answer's questions, averaged over question types. A model that never
    looks at the image (always the train prior, or always against it) scores about
    ``1 / answers per type`` there whatever the test priors are, so it tells on a
    changing-priors split whether a debiasing loss learned the task or a prior shortcut.

    Args:
        answer_types: answer-type names for the breakdown (VQA's three by default).
        question_types: question-type names for the breakdown, or ``None`` for none.
        answers: the answer vocabulary, for the balanced accuracy (``None``: not computed).

    Example::

        metric = VQAAccuracy(question_types=["what color is"])
        metric.update(["red"], [["red"] * 10], answer_types=["other"],
                      question_types=["what color is"])
        metric.compute()  # tensor(1.)
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        answer_types: Sequence[str] = ANSWER_TYPES,
        question_types: Sequence[str] | None = None,
        answers: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.answer_types = list(answer_types)
        self.question_types = list(question_types) if question_types is not None else []
        self._at_index = {t: i for i, t in enumerate(self.answer_types)}
        self._qt_index = {t: i for i, t in enumerate(self.question_types)}
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        for name, n in (("at", len(self.answer_types)), ("qt", len(self.question_types))):
            self.add_state(f"{name}_sum", torch.zeros(n, dtype=torch.float64), "sum")
            self.add_state(f"{name}_count", torch.zeros(n, dtype=torch.long), "sum")
        self._ans_index = {a: i for i, a in enumerate(answers or [])}
        shape = (len(self.question_types), len(self._ans_index)) if self._ans_index else (0, 0)
        self.add_state("qa_sum", torch.zeros(shape, dtype=torch.float64), "sum")
        self.add_state("qa_count", torch.zeros(shape, dtype=torch.long), "sum")

    def _indices(self, values: Sequence[str] | None, index: dict[str, int], what: str) -> list[int]:
        if values is None or not index:
            return []
        out = []
        for v in values:
            if v not in index:
                raise ValueError(
                    f"VQAAccuracy got unknown {what} {v!r}; declared ones are "
                    f"{sorted(index)}. Pass it in `{what}s=` when creating the metric."
                )
            out.append(index[v])
        return out

    def update(
        self,
        predictions: list[str],
        answers: list[list[str]],
        answer_types: Sequence[str] | None = None,
        question_types: Sequence[str] | None = None,
    ) -> None:
        """Score predicted answer strings against each question's annotator answers."""
        if len(predictions) != len(answers):
            raise ValueError(
                f"VQAAccuracy.update got {len(predictions)} predictions but {len(answers)} "
                "answer lists; they must pair up one to one."
            )
        for what, values in (("answer_type", answer_types), ("question_type", question_types)):
            if values is not None and len(values) != len(predictions):
                raise ValueError(
                    f"VQAAccuracy.update got {len(values)} {what}s for {len(predictions)} predictions."
                )
        scores = torch.tensor(
            [answer_accuracy(p, a) for p, a in zip(predictions, answers)], dtype=torch.float64
        )
        self.score_sum += scores.sum().to(self.score_sum.device)
        self.count += len(predictions)
        for prefix, idx in (
            ("at", self._indices(answer_types, self._at_index, "answer_type")),
            ("qt", self._indices(question_types, self._qt_index, "question_type")),
        ):
            if idx:
                i = torch.tensor(idx, dtype=torch.long)
                s, c = getattr(self, f"{prefix}_sum"), getattr(self, f"{prefix}_count")
                s.index_add_(0, i.to(s.device), scores.to(s.device))
                c.index_add_(0, i.to(c.device), torch.ones_like(i).to(c.device))
        if self._ans_index and question_types is not None and self._qt_index:
            self._update_balanced(scores, answers, question_types)

    def _update_balanced(
        self, scores: torch.Tensor, answers: list[list[str]], question_types: Sequence[str]
    ) -> None:
        rows, cols, kept = [], [], []
        for k, (gts, qt) in enumerate(zip(answers, question_types)):
            if not gts:
                continue
            majority = Counter(normalize_answer(a) for a in gts).most_common(1)[0][0]
            if majority in self._ans_index:  # out-of-vocabulary answers: no class to balance
                rows.append(self._qt_index[qt])
                cols.append(self._ans_index[majority])
                kept.append(k)
        if not kept:
            return
        flat = torch.tensor(rows) * self.qa_sum.shape[1] + torch.tensor(cols)
        flat = flat.to(self.qa_sum.device)
        self.qa_sum.view(-1).index_add_(0, flat, scores[kept].to(self.qa_sum.device))
        self.qa_count.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def compute(self) -> torch.Tensor:
        """Overall accuracy in [0, 1] (0 when nothing was scored)."""
        return (self.score_sum / self.count.clamp(min=1)).float()

    def breakdown(self) -> dict[str, Any]:
        """Accuracy by answer type and by question type (categories that were seen), and the
        number of questions scored (``questions``), all summed over the DDP ranks."""
        with self.sync_context(should_sync=self._should_sync()):
            out: dict[str, Any] = {"questions": int(self.count)}
            for key, names, prefix in (
                ("answer_type", self.answer_types, "at"),
                ("question_type", self.question_types, "qt"),
            ):
                s, c = getattr(self, f"{prefix}_sum"), getattr(self, f"{prefix}_count")
                out[key] = {n: float(s[i] / c[i]) for i, n in enumerate(names) if int(c[i]) > 0}
            if self.qa_count.numel() and int(self.qa_count.sum()) > 0:
                seen = self.qa_count > 0
                per_answer = self.qa_sum / self.qa_count.clamp(min=1)
                per_type = (per_answer * seen).sum(1) / seen.sum(1).clamp(min=1)
                has = seen.any(1)
                out["balanced_accuracy"] = float(per_type[has].mean())
                out["balanced_question_type"] = {
                    n: float(per_type[i]) for i, n in enumerate(self.question_types) if has[i]
                }
        return out

    def _should_sync(self) -> bool:
        return torch.distributed.is_available() and torch.distributed.is_initialized()
