"""Does a run read the image? Its balanced accuracy next to what a blind model reaches.

On easy-VQA (and any VQA set with strong per-type answer priors) a model can reach a good
overall accuracy from the question alone. The balanced accuracy (per question type, the mean
over its answers of their accuracy; :class:`~vlcompress.metrics.VQAAccuracy`) does not reward
that: a constant answer per type scores ``1 / k`` on a type with ``k`` answers, whether it is
the train prior or the anti-prior. A run whose balanced accuracy is within
:data:`BLIND_MARGIN` of that baseline answers without the image, whatever its accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["BLIND_MARGIN", "blind_check", "blind_text"]

BLIND_MARGIN = 0.05
"""A run whose balanced accuracy is below the blind balanced baseline plus this margin is
flagged "answers without the image"."""


def blind_check(
    test: Mapping[str, Any],
    data: Mapping[str, Any],
    per_type: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """``results["blind"]``: the balanced accuracy against the blind balanced baseline, overall
    and per question type.

    A model can read the image for some questions and not at all for others (a deep MCAN that
    names colours and shapes but answers every "is there a ..." with the type's commonest
    answer): its overall balanced accuracy looks fine, the types it is blind on do not.

    Args:
        test: the run's test report (``balanced_accuracy``, ``balanced_question_type``).
        data: the run's data section (``blind_balanced_baseline``, from the split report).
        per_type: the split report's ``per_question_type`` (each type's
            ``constant_balanced_baseline``); ``None``: no per-type check.

    Returns:
        ``{"balanced_accuracy", "blind_balanced_baseline", "margin",
        "answers_without_image", "blind_question_types"}`` (the types whose balanced accuracy
        is within :data:`BLIND_MARGIN` of their own constant-answer baseline; empty without
        ``per_type``), or ``None`` when either overall number is missing (a data set without
        question types, or a run without a test).

    Example:
        >>> blind_check({"balanced_accuracy": 0.378}, {"blind_balanced_baseline": 0.376})
        {'balanced_accuracy': 0.378, 'blind_balanced_baseline': 0.376, 'margin': 0.002, 'answers_without_image': True, 'blind_question_types': []}
    """
    bal = test.get("balanced_accuracy")
    base = data.get("blind_balanced_baseline")
    if not isinstance(bal, (int, float)) or not isinstance(base, (int, float)):
        return None
    margin = round(float(bal) - float(base), 6)
    blind_types = []
    for qt, acc in sorted((test.get("balanced_question_type") or {}).items()):
        floor = ((per_type or {}).get(qt) or {}).get("constant_balanced_baseline")
        # a type with one test answer (floor 1.0) cannot tell seeing from guessing
        if isinstance(floor, (int, float)) and floor < 1.0 and acc - floor < BLIND_MARGIN:
            blind_types.append(qt)
    return {
        "balanced_accuracy": float(bal),
        "blind_balanced_baseline": float(base),
        "margin": margin,
        "answers_without_image": margin < BLIND_MARGIN,
        "blind_question_types": blind_types,
    }


def blind_text(check: Mapping[str, Any] | None) -> str:
    """One line for tables and logs: ``"sees the image (+0.61 over blind 0.385)"`` (with
    ``"; BLIND ON 2 question type(s): is, is a"`` where some types are answered blind) or
    ``"ANSWERS WITHOUT THE IMAGE (balanced 0.378, blind 0.376)"``; ``""`` without a check."""
    if not check:
        return ""
    bal, base = check["balanced_accuracy"], check["blind_balanced_baseline"]
    if check["answers_without_image"]:
        return f"ANSWERS WITHOUT THE IMAGE (balanced {bal:.3f}, blind {base:.3f})"
    text = f"sees the image (balanced +{check['margin']:.3f} over blind {base:.3f})"
    types = check.get("blind_question_types") or []
    if types:
        text += f"; BLIND ON {len(types)} question type(s): {', '.join(types)}"
    return text
