"""Our attention inside Hugging Face models: ``attn_implementation="vlcompress"`` routes a
transformers model's attention (BERT and every model written against transformers'
``AttentionInterface``) through :func:`vlcompress.kernels.attention`, so the Triton kernel,
its in-kernel dropout and :func:`~vlcompress.kernels.attention_backend` reach them in training
and evaluation alike. Calls our kernel cannot express (causal, soft-capped, a per-query mask,
non-default scaling, key/value heads shared across query heads) go to transformers' SDPA
function unchanged. Packed sequences (one row with transformers' flash-attention lengths
``cu_seq_lens_q/k``) go to :func:`vlcompress.kernels.attention_varlen`.

Importing this module registers the name with transformers' attention functions and its mask
builders (a padding-only mask stays key padding; the single-stream models import it)::

    config = BertConfig(..., attn_implementation="vlcompress")
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    sdpa_mask,
)

from vlcompress.kernels.dispatch import attention, attention_varlen

__all__ = ["NAME", "key_padding_mask", "vlcompress_attention_forward", "vlcompress_mask"]
NAME = "vlcompress"


def key_padding_mask(
    mask: torch.Tensor | None, batch: int, keys: int
) -> torch.Tensor | bool | None:
    """The ``(B, Lk)`` key padding of a transformers attention mask that only masks keys
    (``(B, 1, 1, Lk)`` bool, True = attend, or expanded to ``(B, 1, Lq, Lk)`` with a zero
    query stride), ``None`` when there is none, or ``False`` when the mask says more than key
    padding (decided from its shape and strides: the device is never read)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != batch:
        return False
    if mask.shape[1] != 1 or mask.shape[3] != keys or (mask.shape[2] != 1 and mask.stride(2)):
        return False
    return mask[:, 0, 0, :]


def vlcompress_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature (``query (B, H, Lq, D)``, returns ``(B, Lq, H, D)``
    and no weights) over :func:`vlcompress.kernels.attention`."""
    b, h, _, d = query.shape
    expressible = (
        not (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and key.shape[1] == h
        and (scaling is None or math.isclose(scaling, d**-0.5, rel_tol=1e-6))
    )
    if kwargs.get("cu_seq_lens_q") is not None:  # packed sequences in one row (varlen)
        if not expressible:
            raise ValueError(
                "packed (cu_seq_lens) attention with vlcompress supports bidirectional "
                "attention at the default scale only; use attn_implementation='flash_attention_2' "
                "for causal, soft-capped or rescaled packed attention"
            )
        return _varlen(query, key, value, dropout, kwargs), None
    kpm = key_padding_mask(attention_mask, b, key.shape[2])
    if kpm is False or not expressible:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, **kwargs,
        )  # fmt: skip
    out = attention(query, key, value, key_padding_mask=kpm, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _varlen(query, key, value, dropout: float, kwargs: dict[str, Any]) -> torch.Tensor:
    """One row of packed sequences ``(1, H, total, D)`` with transformers' flash-attention
    lengths (``cu_seq_lens_q/k``, ``max_length_q/k``) -> ``(1, total, H, D)``."""
    if query.shape[0] != 1 or kwargs.get("cu_seq_lens_k") is None:
        raise ValueError(
            "packed attention takes the sequences as one row (1, H, total, D) with both "
            f"cu_seq_lens_q and cu_seq_lens_k; got a batch of {query.shape[0]} rows"
        )
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))
    out = attention_varlen(
        q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
        kwargs.get("max_length_q"), kwargs.get("max_length_k"), dropout_p=dropout,
    )  # fmt: skip
    return out[None]


def vlcompress_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' mask hook for ``"vlcompress"``: a bidirectional mask that only pads keys
    stays ``(B, 1, 1, Lk)`` (what the kernel takes as key padding; ``None`` without padding);
    any other mask is transformers' SDPA mask (and its calls go to SDPA)."""
    padding_only = (
        mask_function is bidirectional_mask_function
        and local_size is None
        and kv_offset == 0
        and (attention_mask is None or tuple(attention_mask.shape) == (batch_size, kv_length))
    )
    if padding_only:
        return None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset, kv_offset, mask_function=mask_function,
        attention_mask=attention_mask, local_size=local_size, **kwargs,
    )  # fmt: skip


AttentionInterface.register(NAME, vlcompress_attention_forward)
AttentionMaskInterface.register(NAME, vlcompress_mask)
