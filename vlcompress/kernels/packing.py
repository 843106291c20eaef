"""Packing ragged batches for the varlen attention: padded ``(B, L, ...)`` with a mask of real
positions <-> packed ``(total, ...)`` with cumulative lengths (``cu_seqlens``, FlashAttention's
convention: ``[0, n_0, n_0 + n_1, ...]``). Real positions must come first in each row (right
padding), as in every vlcompress batch."""

from __future__ import annotations

import torch

__all__ = ["cu_seqlens", "pack", "unpack"]


def cu_seqlens(mask: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths ``(B + 1,)`` int32 of a right-padded mask ``(B, L)`` (True = real).

    Raises:
        ValueError: when a row has padding before a real position.
    """
    mask = mask.bool()
    lengths = mask.sum(1)
    if not torch.equal(mask, torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        raise ValueError(
            "packing needs right-padded rows (every real position before the padding); "
            "this mask has holes or left padding"
        )
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=mask.device)
    out[1:] = lengths.cumsum(0)
    return out


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, L, ...)`` -> its real positions ``(total, ...)`` in row order, and
    :func:`cu_seqlens` of ``mask``.

    Example::

        packed, cu = pack(tokens, batch.text_mask)      # (total, D), [0, 14, 23, ...]
    """
    return x[mask.bool()], cu_seqlens(mask)


def unpack(packed: torch.Tensor, cu: torch.Tensor, length: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(total, ...)`` -> ``(B, length, ...)``, zeros at padding."""
    b = len(cu) - 1
    lengths = (cu[1:] - cu[:-1]).to(torch.long)
    mask = torch.arange(length, device=packed.device) < lengths[:, None]
    out = packed.new_zeros(b, length, *packed.shape[1:])
    out[mask] = packed
    return out
