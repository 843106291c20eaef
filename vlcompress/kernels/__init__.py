"""Attention kernels and their dispatch: the one entry point every base model's attention uses.

``flash_attention`` (Triton) is imported lazily so that the package works without Triton.
"""

from vlcompress.kernels.dispatch import (
    attention,
    attention_backend,
    attention_varlen,
    triton_available,
)
from vlcompress.kernels.packing import (
    Packing,
    cu_seqlens,
    length_mask,
    pack,
    packed_to_padded,
    padded_to_packed,
    unpack,
)
from vlcompress.kernels.reference import attention_reference

__all__ = [
    "Packing",
    "attention",
    "attention_backend",
    "attention_reference",
    "attention_varlen",
    "cu_seqlens",
    "length_mask",
    "pack",
    "packed_to_padded",
    "padded_to_packed",
    "triton_available",
    "unpack",
]
