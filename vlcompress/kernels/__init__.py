"""Attention kernels and their dispatch: the one entry point every base model's attention uses.

``flash_attention`` (Triton) is imported lazily so that the package works without Triton.
"""

from vlcompress.kernels.dispatch import attention, attention_backend, triton_available
from vlcompress.kernels.reference import attention_reference

__all__ = ["attention", "attention_backend", "attention_reference", "triton_available"]
