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


def blind_check(test: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, Any] | None:
    """``results["blind"]``: the balanced accuracy against the blind balanced baseline.

    Args:
        test: the run's test report (``balanced_accuracy``).
        data: the run's data section (``blind_balanced_baseline``, from the split report).

    Returns:
        ``{"balanced_accuracy", "blind_balanced_baseline", "margin",
        "answers_without_image"}``, or ``None`` when either number is missing (a data set
        without question types, or a run without a test).

    Example:
        >>> blind_check({"balanced_accuracy": 0.378}, {"blind_balanced_baseline": 0.376})
        {'balanced_accuracy': 0.378, 'blind_balanced_baseline': 0.376, 'margin': 0.002, 'answers_without_image': True}
    """
    bal = test.get("balanced_accuracy")
    base = data.get("blind_balanced_baseline")
    if not isinstance(bal, (int, float)) or not isinstance(base, (int, float)):
        return None
    margin = round(float(bal) - float(base), 6)
    return {
        "balanced_accuracy": float(bal),
        "blind_balanced_baseline": float(base),
        "margin": margin,
        "answers_without_image": margin < BLIND_MARGIN,
    }


def blind_text(check: Mapping[str, Any] | None) -> str:
    """One line for tables and logs: ``"sees the image (+0.61 over blind 0.385)"`` or
    ``"ANSWERS WITHOUT THE IMAGE (balanced 0.378, blind 0.376)"``; ``""`` without a check."""
    if not check:
        return ""
    bal, base = check["balanced_accuracy"], check["blind_balanced_baseline"]
    if check["answers_without_image"]:
        return f"ANSWERS WITHOUT THE IMAGE (balanced {bal:.3f}, blind {base:.3f})"
    return f"sees the image (balanced +{check['margin']:.3f} over blind {base:.3f})"
