"""Attention kernels and their dispatch: the one entry point every base model's attention uses."""

from vlcompress.kernels.dispatch import attention

__all__ = ["attention"]
