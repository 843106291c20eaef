"""Base VQA models (one file each) and the anatomy every callback works through."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vlcompress.models.anatomy import (
    BERT_PATTERNS,
    Anatomy,
    AnatomyPatterns,
    Modality,
    anatomy_from_patterns,
    anatomy_of,
)
from vlcompress.models.mcan import MCAN, MCAN_VARIANTS, MCANConfig


def _mcan(variant: str) -> Callable[..., nn.Module]:
    def build(vocab_size: int, num_answers: int, **options) -> nn.Module:
        return MCAN.from_variant(variant, vocab_size, num_answers, **options)

    return build


MODELS: dict[str, Callable[..., nn.Module]] = {f"mcan_{v}": _mcan(v) for v in MCAN_VARIANTS}
"""Registry of named model variants: ``name -> build(vocab_size, num_answers, **options)``."""

MODEL_CONFIGS: dict[str, type] = {f"mcan_{v}": MCANConfig for v in MCAN_VARIANTS}
"""The dataclass whose fields are each model's valid ``options`` (used by config validation)."""


def build_model(name: str, vocab_size: int, num_answers: int, **options) -> nn.Module:
    """Build the registered model ``name``.

    Raises:
        ValueError: for an unknown name (the known ones are listed) or unknown options.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}.")
    return MODELS[name](vocab_size, num_answers, **options)


__all__ = [
    "BERT_PATTERNS",
    "MCAN",
    "MCAN_VARIANTS",
    "MODELS",
    "MODEL_CONFIGS",
    "Anatomy",
    "AnatomyPatterns",
    "MCANConfig",
    "Modality",
    "anatomy_from_patterns",
    "anatomy_of",
    "build_model",
]
