"""Packing ragged batches for the varlen attention: padded ``(B, L, ...)`` with a mask of real
positions <-> packed ``(total, ...)`` with cumulative lengths (``cu_seqlens``, FlashAttention's
convention: ``[0, n_0, n_0 + n_1, ...]``). A row's real positions are packed in order; they need
not be contiguous (attention has no notion of position, so holes in a mask are fine)."""

from __future__ import annotations

import torch

__all__ = ["cu_seqlens", "length_mask", "pack", "unpack"]


def cu_seqlens(mask: torch.Tensor) -> torch.Tensor:
    """Cumulative lengths ``(B + 1,)`` int32 of a mask ``(B, L)`` (True = real)."""
    out = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    out[1:] = mask.bool().sum(1).cumsum(0)
    return out


def length_mask(cu: torch.Tensor, length: int) -> torch.Tensor:
    """The right-padded mask ``(B, length)`` of cumulative lengths ``cu``."""
    lengths = (cu[1:] - cu[:-1]).to(torch.long)
    return torch.arange(length, device=cu.device) < lengths[:, None]


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (B, L, ...)`` -> its real positions ``(total, ...)`` in row order, and
    :func:`cu_seqlens` of ``mask``.

    Example::

        packed, cu = pack(tokens, batch.text_mask)      # (total, D), [0, 14, 23, ...]
    """
    return x[mask.bool()], cu_seqlens(mask)


def unpack(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(total, ...)`` back to ``(B, L, ...)`` at the real
    positions of ``mask (B, L)``, zeros elsewhere."""
    mask = mask.to(packed.device).bool()
    out = packed.new_zeros(*mask.shape, *packed.shape[1:])
    out[mask] = packed
    return out
