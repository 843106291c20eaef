"""``attention``: the single attention entry point of every vlcompress model.

Semantics (every backend must match them):

* ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)``; scale ``1/sqrt(D)``;
* ``key_padding_mask (B, Lk)`` bool, True = a real key; padded keys get no weight;
* ``head_mask (H,)`` or ``(B, H)``, 0/1: dead heads output zeros (and so pass no gradient);
* a query row whose keys are all padded outputs zeros (not NaN, not a uniform average).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention with key padding and dead heads; returns ``(B, H, Lq, D)``."""
    mask = None
    empty = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.bool()
        empty = ~kpm.any(dim=-1)  # (B,) rows with no key at all
        if empty.any():
            kpm = kpm | empty[:, None]
        mask = kpm[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if empty is not None and empty.any():
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    if head_mask is not None:
        hm = head_mask.to(out.dtype)
        hm = hm[None, :, None, None] if hm.dim() == 1 else hm[:, :, None, None]
        out = out * hm
    return out
