"""Packing ragged batches for the varlen attention: padded ``(B, L, ...)`` with a mask of real
positions <-> packed ``(total, ...)`` with cumulative lengths (``cu_seqlens``, FlashAttention's
convention: ``[0, n_0, n_0 + n_1, ...]``). A row's real positions are packed in order; they need
not be contiguous (attention has no notion of position, so holes in a mask are fine).

On a GPU, finding the real positions of a mask reads the device once (the packed size is data);
:class:`Packing` does it once per batch and then packs and unpacks any number of tensors without
another read, and :func:`packed_to_padded` / :func:`padded_to_packed` convert with
``cu_seqlens`` alone (no read at all)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Packing",
    "cu_seqlens",
    "length_mask",
    "pack",
    "packed_to_padded",
    "padded_to_packed",
    "unpack",
]


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


@dataclass(frozen=True)
class Packing:
    """The real positions of one padded batch, found once: packs and unpacks any tensor of that
    batch (``(B, L, ...)`` <-> ``(total, ...)``) with no further host-device synchronisation,
    and carries what the varlen attention needs.

    Attributes:
        mask: ``(B, L)`` bool, True = real.
        index: ``(total,)`` int64 flat positions (into ``B * L``) of the real tokens, row order.
        cu_seqlens: ``(B + 1,)`` int32 cumulative lengths.
        max_seqlen: ``L``: an upper bound of every sequence's length known without reading the
            device (the kernels skip what lies beyond a sequence's own length).

    Example::

        text = Packing.of(batch.text_mask)                     # one device read
        x = text.pack(hidden)                                  # (total, D)
        out = attention_varlen(q, k, v, text.cu_seqlens, text.cu_seqlens,
                               text.max_seqlen, text.max_seqlen)
        hidden = text.unpack(x)                                # (B, L, D), zeros at padding
    """

    mask: torch.Tensor
    index: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def of(cls, mask: torch.Tensor) -> Packing:
        """The packing of ``mask (B, L)`` (True = real)."""
        if mask.dim() != 2:
            raise ValueError(f"a packing mask must be (B, L), got {tuple(mask.shape)}")
        mask = mask.bool()
        index = mask.flatten().nonzero().squeeze(1)  # the one read of the device
        return cls(mask, index, cu_seqlens(mask), mask.shape[1])

    @classmethod
    def full(cls, batch: int, length: int, device: torch.device | str) -> Packing:
        """The packing of a batch without padding (no read of the device)."""
        mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
        return cls(mask, torch.arange(batch * length, device=device), cu, length)

    @property
    def total(self) -> int:
        """The number of real tokens."""
        return self.index.numel()

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, L, ...)`` -> ``(total, ...)``."""
        if x.shape[:2] != self.mask.shape:
            raise ValueError(
                f"cannot pack a {tuple(x.shape)} tensor with a {tuple(self.mask.shape)} packing"
            )
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``(total, ...)`` -> ``(B, L, ...)``, zeros at padded positions."""
        if packed.shape[0] != self.total:
            raise ValueError(
                f"cannot unpack {packed.shape[0]} rows with a packing of {self.total} tokens"
            )
        flat = packed.new_zeros(self.mask.numel(), *packed.shape[1:])
        return flat.index_copy(0, self.index, packed).view(*self.mask.shape, *packed.shape[1:])


def packed_to_padded(
    packed: torch.Tensor, cu: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows ``(total, ...)`` with cumulative lengths ``cu`` -> right-padded
    ``(B, length, ...)`` (zeros at padding) and its mask, without reading the device. Sequences
    longer than ``length`` are cut."""
    cu = cu.to(packed.device, torch.int64, non_blocking=True)
    mask = length_mask(cu, length)
    shape = (*mask.shape, *packed.shape[1:])
    if packed.shape[0] == 0:
        return packed.new_zeros(shape), mask
    rows = (cu[:-1, None] + torch.arange(length, device=packed.device)).clamp_(
        max=packed.shape[0] - 1
    )
    out = packed.index_select(0, rows.flatten()).view(shape)
    return out * mask.view(*mask.shape, *(1,) * (packed.dim() - 1)), mask


def padded_to_packed(padded: torch.Tensor, cu: torch.Tensor, total: int) -> torch.Tensor:
    """The inverse of :func:`packed_to_padded`: right-padded ``(B, L, ...)`` -> the first
    ``cu[b + 1] - cu[b]`` positions of each row, packed ``(total, ...)``, without reading the
    device (``total`` = ``cu[-1]``, known to the caller)."""
    cu = cu.to(padded.device, torch.int64, non_blocking=True)
    pos = torch.arange(total, device=padded.device)
    row = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
    return padded.flatten(0, 1).index_select(0, row * padded.shape[1] + pos - cu[row])
