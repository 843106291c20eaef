"""``attention``: the single attention entry point of every vlcompress model.

Semantics (every backend matches :func:`vlcompress.kernels.reference.attention_reference`):

* ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)``; scale ``1/sqrt(D)``;
* ``key_padding_mask (B, Lk)`` bool, True = a real key; padded keys get no weight;
* ``head_mask (H,)`` or ``(B, H)``, 0/1: dead heads output zeros (and so pass no gradient);
* ``block_layout`` with ``block_size``: query block i sees key block j only where it is True;
* a query row whose keys are all masked outputs zeros (not NaN, not a uniform average).

Backends: the Triton kernel on CUDA (when Triton is installed, no attention dropout is asked
for and the head dim is supported), else torch SDPA. ``backend=`` forces one ("triton" also
runs on the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from vlcompress.kernels.reference import apply_head_mask, expand_block_layout

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "sdpa")


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (GPU builds of torch ship it; CPU test runs install it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_FAILED: list[str] = []


def _use_triton(q: torch.Tensor, dropout_p: float) -> bool:
    """The automatic choice: CUDA, no dropout, a supported head dim, Triton importable and
    not failed before in this process."""
    from vlcompress.kernels.flash_attention_limits import HEAD_DIMS

    return (
        q.is_cuda
        and dropout_p == 0.0
        and q.shape[-1] in HEAD_DIMS
        and not _TRITON_FAILED
        and triton_available()
    )


def _disable_triton(error: Exception) -> None:
    """Fall back to SDPA for the rest of the process, saying why once."""
    _TRITON_FAILED.append(f"{type(error).__name__}: {error}")
    log.warning(
        "Triton attention failed (%s: %s); using torch SDPA from now on.",
        type(error).__name__,
        error,
    )


def _sdpa(q, k, v, key_padding_mask, head_mask, block_layout, block_size, dropout_p):
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask.bool()[:, None, None, :]
    if block_layout is not None:
        lay = expand_block_layout(block_layout.to(q.device), block_size, b, h, lq, lk)
        allowed = lay if allowed is None else allowed & lay
    empty = None
    if allowed is not None:
        empty = ~allowed.any(dim=-1, keepdim=True)  # rows with no key (broadcast shape)
        if empty.any():
            allowed = allowed | empty
        else:
            empty = None
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return apply_head_mask(out, head_mask)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_layout: torch.Tensor | None = None,
    block_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with key padding, dead heads and block sparsity.

    Returns ``(B, H, Lq, D)``.

    Raises:
        ValueError: for an unknown backend, or ``backend="triton"`` with dropout.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    use_triton = _use_triton(q, dropout_p) if backend == "auto" else backend == "triton"
    if use_triton:
        if dropout_p:
            raise ValueError(
                "the Triton attention kernel has no attention dropout; use backend='sdpa'"
            )
        from vlcompress.kernels.flash_attention import flash_attention

        args = (q, k, v, key_padding_mask, head_mask, block_layout, block_size)
        if backend == "triton":
            return flash_attention(*args)
        try:
            return flash_attention(*args)
        except Exception as e:  # a Triton build that cannot compile the kernel on this GPU
            _disable_triton(e)
    return _sdpa(q, k, v, key_padding_mask, head_mask, block_layout, block_size, dropout_p)
