"""``attention``: the single attention entry point of every vlcompress model.

Semantics (every backend matches :func:`vlcompress.kernels.reference.attention_reference`):

* ``q (B, H, Lq, D)``, ``k, v (B, H, Lk, D)``; scale ``1/sqrt(D)``;
* ``key_padding_mask (B, Lk)`` bool, True = a real key; padded keys get no weight;
* ``head_mask (H,)`` or ``(B, H)``, 0/1: dead heads output zeros (and so pass no gradient);
* ``block_layout`` with ``block_size``: query block i sees key block j only where it is True;
* a query row whose keys are all masked outputs zeros (not NaN, not a uniform average).

Backends: the Triton kernel on CUDA (when Triton is installed and the head dim is supported;
attention dropout runs inside the kernel, so training uses it too), else torch SDPA.
``backend=`` forces one ("triton" also runs on the CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from vlcompress.kernels.reference import apply_head_mask, expand_block_layout

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "sdpa")
_DEFAULT_BACKEND: contextvars.ContextVar[str] = contextvars.ContextVar(
    "vlcompress_attention_backend", default="auto"
)


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Make ``name`` the backend of every :func:`attention` call (of any model) inside the
    block whose caller does not choose one.

    Raises:
        ValueError: for an unknown backend.

    Example::

        with attention_backend("sdpa"):
            logits = model(batch)
    """
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    token = _DEFAULT_BACKEND.set(name)
    try:
        yield
    finally:
        _DEFAULT_BACKEND.reset(token)


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (GPU builds of torch ship it; CPU test runs install it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_FAILED: list[str] = []


def _use_triton(q: torch.Tensor) -> bool:
    """The automatic choice: CUDA, a supported head dim, Triton importable and not failed
    before in this process."""
    from vlcompress.kernels.flash_attention_limits import HEAD_DIMS

    return q.is_cuda and q.shape[-1] in HEAD_DIMS and not _TRITON_FAILED and triton_available()


def _disable_triton(error: Exception) -> None:
    """Fall back to SDPA for the rest of the process, saying why once."""
    _TRITON_FAILED.append(f"{type(error).__name__}: {error}")
    log.warning(
        "Triton attention failed (%s: %s); using torch SDPA from now on.",
        type(error).__name__,
        error,
    )


def _checked(backend: str | None, dropout_p: float) -> str:
    """The call's backend (``None``: :func:`attention_backend`'s), checked with the dropout."""
    backend = _DEFAULT_BACKEND.get() if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention dropout_p must be in [0, 1), got {dropout_p}")
    return backend


def _on_triton(backend: str, q: torch.Tensor, kernel: Any) -> torch.Tensor | None:
    """``kernel()`` when ``backend`` picks Triton for ``q``, else ``None`` (use SDPA). In
    ``auto`` mode a kernel that fails to build or launch disables Triton for the process and
    gives ``None``; bad input (``ValueError``) is raised, as SDPA would refuse it too."""
    if not (_use_triton(q) if backend == "auto" else backend == "triton"):
        return None
    if backend == "triton":
        return kernel()
    try:
        return kernel()
    except ValueError:
        raise
    except Exception as e:  # a Triton build that cannot compile the kernel on this GPU
        _disable_triton(e)
        return None


def _kernel_head_mask(
    head_mask: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What the kernel takes of a head mask (its liveness: nonzero = live, dead heads are
    skipped) and what is applied to its output afterwards: a floating mask scales the heads
    (SDPA's semantics: ``out * mask``, so soft masks scale and a mask that requires a gradient
    gets one; such a mask keeps every head computed, as a gate at 0 still has a gradient)."""
    if head_mask is None or not head_mask.is_floating_point():
        return head_mask, None
    if head_mask.requires_grad and torch.is_grad_enabled():
        return None, head_mask
    return head_mask, head_mask


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
        # rows with no key (broadcast shape) attend to everything, then output zeros; done
        # unconditionally, as asking whether there are any would make the host wait
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | empty
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
    block_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention with key padding, dead heads, block sparsity and
    attention dropout (``dropout_p``: the Triton kernel draws its mask in-kernel from a seed of
    torch's generator; SDPA uses its own).

    ``backend``: ``auto``, ``triton`` or ``sdpa``; ``None`` = the one set by
    :func:`attention_backend` (``auto`` outside it).

    Returns ``(B, H, Lq, D)``.

    Raises:
        ValueError: for an unknown backend, or a ``dropout_p`` outside ``[0, 1)``.
    """
    backend = _checked(backend, dropout_p)

    def kernel() -> torch.Tensor:
        from vlcompress.kernels.flash_attention import flash_attention

        live, scale = _kernel_head_mask(head_mask)
        out = flash_attention(q, k, v, key_padding_mask, live, block_layout, block_size,
                              None, dropout_p)  # fmt: skip
        return out if scale is None else apply_head_mask(out, scale)

    out = _on_triton(backend, q, kernel)
    if out is not None:
        return out
    return _sdpa(q, k, v, key_padding_mask, head_mask, block_layout, block_size or 64, dropout_p)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention over packed sequences (``q (total_q, H, D)``, ``k, v (total_k, H, D)``, see
    :func:`vlcompress.kernels.flash_attention.flash_attention_varlen`): the Triton kernel on
    CUDA (no padding computed at all), else SDPA on the sequences unpacked to a padded batch
    (the same results). Returns ``(total_q, H, D)``.

    Raises:
        ValueError: for an unknown backend or bad cumulative lengths.
    """
    backend = _checked(backend, dropout_p)

    def kernel() -> torch.Tensor:
        from vlcompress.kernels.flash_attention import flash_attention_varlen

        live, scale = _kernel_head_mask(head_mask)
        out = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, live, dropout_p=dropout_p)  # fmt: skip
        if scale is None:
            return out
        scale = scale.to(out.device, out.dtype)
        if scale.dim() == 2:  # per (sequence, head): each query row takes its sequence's
            lengths = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(out.device, torch.long,
                                                                non_blocking=True)  # fmt: skip
            scale = scale.repeat_interleave(lengths, dim=0, output_size=out.shape[0])
        return out * scale[..., None]

    out = _on_triton(backend, q, kernel)
    if out is not None:
        return out
    from vlcompress.kernels.packing import packed_to_padded, padded_to_packed

    lq = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if max_seqlen_q is None else max_seqlen_q
    lk = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max()) if max_seqlen_k is None else max_seqlen_k
    qp, _ = packed_to_padded(q, cu_seqlens_q, lq)
    kp, kpm = packed_to_padded(k, cu_seqlens_k, lk)
    vp, _ = packed_to_padded(v, cu_seqlens_k, lk)
    out = _sdpa(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), kpm, head_mask,
                None, 64, dropout_p)  # fmt: skip
    return padded_to_packed(out.transpose(1, 2), cu_seqlens_q, q.shape[0])
