"""Re-splitting any VQA data set with changing priors (VQA-CP style), and split reports.

VQA-CP v2 was built from VQA v2 by pooling all questions, grouping them by question type and
answer, and assigning whole (type, answer) groups to train or test so that, per question type,
the answer distributions of train and test differ. :func:`changing_priors_split` does that for
any benchmark that gives each question a type and an answer, so a data module offers
``split: cp`` by configuration.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["answer_distribution_report", "changing_priors_split", "total_variation"]


def total_variation(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Total-variation distance between two answer distributions (0 = same, 1 = disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def _distribution(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {k: v / total for k, v in counter.items()} if total else {}


def changing_priors_split(
    question_types: Sequence[str],
    answers: Sequence[str],
    test_fraction: float,
    leak: float,
    rng: random.Random,
) -> tuple[list[int], list[int]]:
    """Indices of a train / test split whose per-type answer priors differ.

    Per question type, (type, answer) groups are taken in a random order and assigned to test
    until the type's test share reaches ``test_fraction`` (the last group always stays in
    train); a ``leak`` share of every group crosses to the other side, so each answer stays
    learnable for each type (``leak=0``: whole groups, as in VQA-CP). As in VQA-CP, an answer
    that no training question has gets its smallest test group moved back to train.

    Args:
        question_types: one type per question.
        answers: one (majority) answer per question.
        test_fraction: per type, the share of questions sent to test, in (0, 1).
        leak: share of each group that crosses over, in [0, 0.5).
        rng: the random source (seeded by the caller).

    Raises:
        ValueError: for mismatched lengths or fractions out of range.
    """
    if len(question_types) != len(answers):
        raise ValueError(
            f"changing_priors_split: {len(question_types)} question types but {len(answers)} answers"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= leak < 0.5:
        raise ValueError(f"leak must be in [0, 0.5), got {leak}")
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (qt, ans) in enumerate(zip(question_types, answers)):
        groups[qt][ans].append(i)
    train: list[int] = []
    test: list[int] = []
    chosen: dict[str, list[str]] = defaultdict(list)
    for qtype in sorted(groups):
        by_answer = groups[qtype]
        order = sorted(by_answer)
        rng.shuffle(order)
        total = sum(len(v) for v in by_answer.values())
        n_test = 0
        for k, ans in enumerate(order):
            last_left = k == len(order) - 1
            group = list(by_answer[ans])
            rng.shuffle(group)
            n_leak = int(round(leak * len(group)))
            if n_test < test_fraction * total and not last_left:
                test.extend(group[n_leak:])
                train.extend(group[:n_leak])
                n_test += len(group)
                chosen[qtype].append(ans)
            else:
                train.extend(group[n_leak:])
                test.extend(group[:n_leak])
    train_answers = {answers[i] for i in train}
    for ans in sorted({answers[i] for i in test} - train_answers):
        qtype = min((q for q in chosen if ans in chosen[q]), key=lambda q: len(groups[q][ans]))
        moved = set(groups[qtype][ans]) - set(train)
        test = [i for i in test if i not in moved]
        train.extend(moved)
    return sorted(train), sorted(test)


def answer_distribution_report(
    question_types: Sequence[str],
    answers: Sequence[str],
    index: Mapping[str, Sequence[int]],
    split: str,
) -> dict[str, Any]:
    """Per question type: the answer distributions of train and test, their TV distance, and
    two blind baselines on test.

    The baselines read only the question type: ``prior`` answers the type's most frequent
    train answer, ``anti_prior`` its least frequent one (for yes/no types with both answers in
    train: the other answer).
    On a changing-priors split a model that learned to answer *against* the train prior
    scores ``anti_prior`` without looking at the image; a debiasing loss that merely reaches
    it has learned that shortcut, not the task (Teney et al., 2020). Both are the share of
    test questions whose majority answer they match (the soft VQA score differs only for
    questions with disagreeing annotators).

    A third baseline is balanced: any constant answer per type scores ``1 / k`` of the balanced
    accuracy on a type with ``k`` test answers (``constant_balanced_baseline`` per type; their
    mean over types is ``blind_balanced_baseline``, what :func:`vlcompress.metrics.blind_check`
    compares a run's balanced accuracy with).

    Args:
        question_types, answers: per question.
        index: question indices per part (``train``, ``val``, ``test``).
        split: the split's name, recorded in the report.
    """
    per_type: dict[str, Any] = {}
    hits = {"prior": 0, "anti_prior": 0}
    n_test = 0
    for qt in sorted(set(question_types)):
        counts = {}
        for part in ("train", "test"):
            counts[part] = Counter(answers[i] for i in index[part] if question_types[i] == qt)
        dist = {part: _distribution(c) for part, c in counts.items()}
        entry: dict[str, Any] = {
            "tv_distance": total_variation(dist["train"], dist["test"]),
            "train": dist["train"],
            "test": dist["test"],
        }
        if counts["train"]:
            ranked = sorted(counts["train"], key=lambda a: (-counts["train"][a], a))
            for name, ans in (("prior", ranked[0]), ("anti_prior", ranked[-1])):
                entry[f"{name}_answer"] = ans
                entry[f"{name}_baseline"] = dist["test"].get(ans, 0.0)
                hits[name] += counts["test"].get(ans, 0)
        if counts["test"]:
            entry["constant_balanced_baseline"] = 1.0 / len(counts["test"])
        n_test += sum(counts["test"].values())
        per_type[qt] = entry
    tvs = [v["tv_distance"] for v in per_type.values()]
    constant = [
        v["constant_balanced_baseline"]
        for v in per_type.values()
        if "constant_balanced_baseline" in v
    ]
    return {
        "split": split,
        "sizes": {k: int(len(v)) for k, v in index.items()},
        "mean_tv_distance": float(np.mean(tvs)) if tvs else 0.0,
        "prior_baseline": hits["prior"] / n_test if n_test else 0.0,
        "anti_prior_baseline": hits["anti_prior"] / n_test if n_test else 0.0,
        "blind_balanced_baseline": float(np.mean(constant)) if constant else None,
        "per_question_type": per_type,
    }
