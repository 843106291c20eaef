"""``nn.Module`` forms of the attention functions (importing this needs Triton)."""

from __future__ import annotations

import torch

from vlcompress.kernels.flash_attention import flash_attention
from vlcompress.kernels.flash_attention_limits import BLOCK_SIZES

__all__ = ["FlashAttention"]


class FlashAttention(torch.nn.Module):
    """Module form of :func:`~vlcompress.kernels.flash_attention.flash_attention`.

    Args:
        block_size: query/key block size (and the granularity of ``block_layout``); ``None``:
            tuned per shape on a GPU.
        scale: softmax scale (default ``1/sqrt(head_dim)``).
        dropout: attention dropout in training mode (drawn inside the kernel).

    Raises:
        ValueError: for an unsupported block size.
    """

    def __init__(
        self, block_size: int | None = None, scale: float | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if block_size is not None and block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        self.block_size, self.scale, self.dropout = block_size, scale, dropout

    def forward(
        self, q, k, v, key_padding_mask=None, head_mask=None, block_layout=None
    ) -> torch.Tensor:
        """``(B, H, Lq, D)``; see :func:`~vlcompress.kernels.flash_attention.flash_attention`."""
        p = self.dropout if self.training else 0.0
        return flash_attention(q, k, v, key_padding_mask, head_mask, block_layout,
                               self.block_size, self.scale, p)  # fmt: skip
