"""``pair``: a statement about two images, True or False (NLVR2's formulation), as a task.

It is :class:`~vlcompress.tasks.vqa.VQATask` over two answers, ``false`` and ``true``, in that
order: the same losses, optimiser and schedules, and the same accuracy (every example has one
answer, so the VQA accuracy is the plain accuracy; the balanced accuracy averages the True and
False accuracies per statement type). What it adds is the check that the data and the model
are both about pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlcompress import registry
from vlcompress.data.contract import PAIR_ANSWERS
from vlcompress.models import contract
from vlcompress.tasks.vqa import VQATask

__all__ = ["PAIR_ANSWERS", "PairTask", "PairTaskOptions"]


class PairTask(VQATask):
    """True / False over a statement and two images; see :class:`VQATask` for the arguments.

    Raises:
        ValueError: when the answers are not ``("false", "true")`` or the model does not read
            image pairs (each named with the fix).

    Example::

        task = PairTask(build_model("vilt_tiny", 50, 2, head="pair"), answers=["false", "true"])
    """

    def __init__(self, model: Any, answers: Any, **kwargs: Any) -> None:
        if tuple(answers) != PAIR_ANSWERS:
            raise ValueError(
                f"task pair answers {list(PAIR_ANSWERS)}, the data has {list(answers)[:5]}; use "
                "a pair data module (easy_pairs, nlvr2) or task.name: vqa."
            )
        if not contract.reads_pairs(model):
            raise ValueError(
                f"task pair needs a model that reads two images per example; "
                f"{type(model).__name__} reads one (use vilt_* with model.options.head: pair)."
            )
        super().__init__(model, answers, **kwargs)


@dataclass(frozen=True)
class PairTaskOptions:
    """Options of the ``pair`` task: none of its own (see ``loss``, ``optim``, ``scheduler``)."""


@registry.register(
    "task",
    "pair",
    options=PairTaskOptions,
    context=("model", "answers", "loss", "optimizer", "scheduler", "answer_types",
             "question_types", "question_type_prior"),
)  # fmt: skip
def pair_task(options: PairTaskOptions, **context: Any) -> PairTask:
    """Pairs: a statement about two images, True / False (:class:`PairTask`)."""
    return PairTask(**context)
