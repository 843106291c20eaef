"""Plain-torch attention with the exact semantics every vlcompress attention backend follows.

* ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)``, scale ``1/sqrt(D)`` unless given;
* ``key_padding_mask (B, Lk)`` bool, True = a real key;
* ``head_mask (H,)`` or ``(B, H)``: 0 = a dead head, whose output (and so gradient) is zero;
* ``block_layout (nQB, nKB)``, ``(H, nQB, nKB)`` or ``(B, H, nQB, nKB)`` bool with ``block_size``:
  query block i sees key block j only where the layout is True;
* a query row that sees no key at all outputs zeros (not NaN, not a uniform average).

The Triton kernel is tested against this function; benchmarks import it too.
"""

from __future__ import annotations

import math

import torch


def expand_block_layout(
    layout: torch.Tensor, block_size: int, b: int, h: int, lq: int, lk: int
) -> torch.Tensor:
    """A ``(B, H, nQB, nKB)`` block layout as an element mask ``(B, H, Lq, Lk)``."""
    while layout.dim() < 4:
        layout = layout.unsqueeze(0)
    layout = layout.expand(b, h, *layout.shape[-2:]).bool()
    full = layout.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return full[:, :, :lq, :lk]


def apply_head_mask(out: torch.Tensor, head_mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the dead heads of ``out (B, H, L, D)``; ``head_mask`` is ``(H,)`` or ``(B, H)``."""
    if head_mask is None:
        return out
    hm = head_mask.to(out.device, out.dtype)
    hm = hm[None, :, None, None] if hm.dim() == 1 else hm[:, :, None, None]
    return out * hm


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    block_layout: torch.Tensor | None = None,
    block_size: int = 64,
    scale: float | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention computed in fp32 with explicit masks; returns ``(B, H, Lq, D)`` in q's dtype.

    With ``dropout_mask`` ``(B, H, Lq, Lk)`` bool (True = kept), the probabilities it drops are
    zeroed and the rest scaled by ``1 / (1 - dropout_p)`` (e.g. the mask of a Triton call from
    :func:`vlcompress.kernels.flash_attention.dropout_keep_mask`)."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask.bool()[:, None, None, :]
    if block_layout is not None:
        allowed = allowed & expand_block_layout(block_layout.to(q.device), block_size, b, h, lq, lk)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no key: all -inf -> NaN -> 0
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.device, p.dtype) / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bhkd->bhqd", p, v.float())
    out = apply_head_mask(out, head_mask)
    return out.to(q.dtype)
