"""Base VQA models (one file each, each registering itself), the contract they meet
(:mod:`~vlcompress.models.contract`: :class:`VQAModel`) and the anatomy every callback works
through.

Importing this package is cheap: it loads the anatomy and the contract only. Model files are imported by the
registry on first use (``vlcompress.registry.components("model")``) or directly, e.g.
``from vlcompress.models.mcan import MCAN``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlcompress import registry
from vlcompress.models import anatomy as _anatomy
from vlcompress.models.anatomy import *  # noqa: F403 - the anatomy's public names
from vlcompress.models.contract import SlimmableVQAModel, VQAModel


def build_model(name: str, vocab_size: int, num_answers: int, **options: Any) -> nn.Module:
    """Build the registered model ``name`` with ``options`` (fields of its options dataclass).

    Returns:
        The model: a :class:`~vlcompress.models.contract.VQAModel`.

    Raises:
        vlcompress.registry.UnknownComponentError: for an unknown name (closest names listed).
        TypeError, ValueError: for unknown or contradictory options.
    """
    return registry.build("model", name, options, vocab_size=vocab_size, num_answers=num_answers)


__all__ = [*_anatomy.__all__, "SlimmableVQAModel", "VQAModel", "build_model"]
