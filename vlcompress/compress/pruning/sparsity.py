"""Sparsity targets: what fraction of which weights to zero, uniformly or per modality.

Sparsity always means the fraction of weights *zeroed* (0.9 keeps 10%). Seed 000's public code
calls the kept fraction "sparsity"; we never do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["MODALITY_KEYS", "overall_sparsity", "parse_sparsity", "target_for"]

MODALITY_KEYS = ("language", "vision", "cross")
"""Modalities a per-modality sparsity may name (the anatomy's :class:`Modality` values)."""


def _check_fraction(value: Any, what: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{what} must be a number in [0, 1); got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{what} must be in [0, 1) (the fraction of {meaning}; 0.9 keeps 10%); got {value!r}"
        )
    return value


def parse_sparsity(
    spec: float | Mapping[str, float], what: str = "sparsity", meaning: str = "weights zeroed"
) -> dict[str, float]:
    """Normalise a sparsity target to ``{modality: fraction removed}``.

    Args:
        spec: one fraction for every modality (``0.5``), or a mapping naming modalities
            (``{"language": 0.6, "vision": 0.04, "cross": 0.6}``); a modality left out of the
            mapping is not pruned. ``"default"`` in the mapping applies to the modalities it
            does not name.
        what: the argument's name, for messages.
        meaning: what the fraction counts, for messages (``"weights zeroed"``; structured
            pruning: ``"attention heads removed"``).

    Returns:
        ``{"language"|"vision"|"cross"|"default": fraction}``; a plain number comes back as
        ``{"default": fraction}``.

    Raises:
        TypeError: not a number or a mapping of numbers.
        ValueError: a fraction outside ``[0, 1)``, or an unknown modality name.
    """
    if isinstance(spec, Mapping):
        out: dict[str, float] = {}
        for key, value in spec.items():
            if key not in (*MODALITY_KEYS, "default"):
                raise ValueError(
                    f"{what}: unknown modality {key!r}; use {list(MODALITY_KEYS)} (or 'default' "
                    "for the modalities not named)"
                )
            out[str(key)] = _check_fraction(value, f"{what}[{key!r}]", meaning)
        if not out:
            raise ValueError(f"{what}: the mapping is empty; name at least one modality")
        return out
    return {"default": _check_fraction(spec, what, meaning)}


def target_for(targets: Mapping[str, float], modality: str) -> float | None:
    """The fraction for ``modality`` under :func:`parse_sparsity`'s output (None: not pruned)."""
    if modality in targets:
        return targets[modality]
    return targets.get("default")


def overall_sparsity(sizes: Mapping[str, int], targets: Mapping[str, float]) -> float:
    """Weighted mean target over modalities, weighted by their prunable weight counts.

    Args:
        sizes: ``{modality: number of prunable weights}``.
        targets: :func:`parse_sparsity`'s output.
    """
    total = sum(sizes.values())
    if not total:
        return 0.0
    return sum(n * (target_for(targets, m) or 0.0) for m, n in sizes.items()) / total
