"""The tensors of a loaded checkpoint, for the encoders' loaders (one unwrapping rule)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def tensor_state(raw: Any, file: str | Path, what: str, expected: str) -> dict[str, torch.Tensor]:
    """``raw``'s tensors: a ``{"state_dict": ...}`` wrapper unwrapped, DDP's ``module.`` prefix
    dropped, non-tensor entries skipped.

    Args:
        raw: what ``torch.load`` (or a TorchScript archive's ``state_dict()``) returned.
        file: the file it came from (for the message).
        what: the checkpoint's kind, with its article (``"a CLIP checkpoint"``).
        expected: what the file should hold (``"a dict of tensors"``).

    Raises:
        ValueError: ``raw`` is not a mapping.
    """
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{str(file)!r} is not {what}: expected {expected}, found a {type(raw).__name__}."
        )
    return {str(k).removeprefix("module."): v for k, v in raw.items() if torch.is_tensor(v)}
