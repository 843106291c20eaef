"""Fused attention for short, ragged VL sequences: Triton kernels, launcher, autograd.

Forward (online softmax, FlashAttention-2 style) and backward (one kernel for dK/dV over key
blocks, one for dQ over query blocks) with:

* self- and cross-attention (``Lq != Lk``);
* key padding: each sequence's loop stops after its last real key, so padding costs nothing
  beyond the block it sits in; padded keys inside that block are masked;
* dead heads (``head_mask`` per head or per batch-and-head): their programs load nothing and
  write zeros, so they cost one launch slot and give zero output and zero gradients;
* a block-sparse layout: query block ``i`` visits key block ``j`` only where the layout is set;
* head dims 16, 32, 64, 128; fp16 / bf16 on GPU, fp32 everywhere (``TRITON_INTERPRET=1``).

Semantics are those of :func:`vlcompress.kernels.reference.attention_reference`, including
zeros for query rows that see no key.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vlcompress.kernels.flash_attention_limits import BLOCK_SIZES, HEAD_DIMS


@triton.jit
def _load_kv_block(K, V, KMASK, kv_base, b, start_n, Lk, HAS_KMASK: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """One block of keys and values, and which of its keys are real."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    in_range = offs_n < Lk
    n_valid = in_range
    if HAS_KMASK:
        n_valid = n_valid & (tl.load(KMASK + b * Lk + offs_n, mask=in_range, other=0) != 0)
    kv_off = kv_base + offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    k = tl.load(K + kv_off, mask=in_range[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=in_range[:, None], other=0.0)
    return k, v, n_valid


@triton.jit
def _keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p):
    """Which (query, key) pairs of a block survive dropout: Philox (``tl.rand``) keyed by the
    call's seed + the (batch, head) index, counted by ``query * Lk + key``; the same numbers in
    the forward, both backward kernels and :func:`dropout_keep_mask`."""
    seed = tl.load(SEED) + pid_bh
    return tl.rand(seed, offs_m[:, None] * Lk + offs_n[None, :]) >= dropout_p


@triton.jit
def _keep_mask_kernel(SEED, KEEP, Lq, Lk, dropout_p,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p)
    ptr = KEEP + pid_bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
    tl.store(ptr, keep.to(tl.int8), mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, KMASK, KVLEN, HMASK, LAYOUT, SEED,
    lay_sb, lay_sh, lay_sq,
    scale, H, Lq, Lk, dropout_p,
    HAS_KMASK: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    live = tl.load(HMASK + pid_bh) != 0
    kv_end = tl.where(live, tl.load(KVLEN + b), 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    q_base = pid_bh.to(tl.int64) * Lq * BLOCK_D
    kv_base = pid_bh.to(tl.int64) * Lk * BLOCK_D
    q_rows = offs_m < tl.where(live, Lq, 0)  # a dead head loads nothing
    q = tl.load(
        Q + q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=q_rows[:, None], other=0.0
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lay_base = b * lay_sb + h * lay_sh + pid_m * lay_sq
    for start_n in range(0, kv_end, BLOCK_N):
        if HAS_LAYOUT:
            keep = tl.load(LAYOUT + lay_base + start_n // BLOCK_N) != 0
        else:
            keep = True
        if keep:
            k, v, n_valid = _load_kv_block(
                K, V, KMASK, kv_base, b, start_n, Lk, HAS_KMASK, BLOCK_N, BLOCK_D
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser sees every key
            if HAS_DROPOUT:
                offs_n = start_n + tl.arange(0, BLOCK_N)
                p = tl.where(_keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p), p, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(
        OUT + q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :],
        out.to(OUT.dtype.element_ty),
        mask=m_valid[:, None],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=m_valid)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KMASK, KVLEN, HMASK, LAYOUT, SEED,
    lay_sb, lay_sh, lay_sq,
    scale, H, Lq, Lk, dropout_p,
    HAS_KMASK: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    live = tl.load(HMASK + pid_bh) != 0
    start_n = pid_n * BLOCK_N
    active = live & (start_n < tl.load(KVLEN + b))
    q_end = tl.where(active, Lq, 0)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    in_range = offs_n < Lk
    n_valid = in_range
    if HAS_KMASK:
        n_valid = n_valid & (tl.load(KMASK + b * Lk + offs_n, mask=in_range, other=0) != 0)
    q_base = pid_bh.to(tl.int64) * Lq * BLOCK_D
    kv_base = pid_bh.to(tl.int64) * Lk * BLOCK_D
    kv_off = kv_base + offs_n[:, None] * BLOCK_D + offs_d[None, :]
    kv_rows = offs_n < tl.where(
        active, Lk, 0
    )  # dead heads and blocks past the last key load nothing
    k = tl.load(K + kv_off, mask=kv_rows[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=kv_rows[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lay_base = b * lay_sb + h * lay_sh + pid_n
    for start_m in range(0, q_end, BLOCK_M):
        if HAS_LAYOUT:
            keep = tl.load(LAYOUT + lay_base + (start_m // BLOCK_M) * lay_sq) != 0
        else:
            keep = True
        if keep:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < Lq
            q_off = q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :]
            q = tl.load(Q + q_off, mask=m_valid[:, None], other=0.0)
            do = tl.load(DO + q_off, mask=m_valid[:, None], other=0.0)
            lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=float("inf"))
            delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(n_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROPOUT:  # the forward's mask, regenerated: Z = keep / (1 - p_drop)
                keep = _keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p)
                p_out = tl.where(keep, p, 0.0) / (1.0 - dropout_p)
                dp = tl.where(keep, dp, 0.0) / (1.0 - dropout_p)
            else:
                p_out = p
            dv += tl.dot(tl.trans(p_out.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=in_range[:, None])
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=in_range[:, None])


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KMASK, KVLEN, HMASK, LAYOUT, SEED,
    lay_sb, lay_sh, lay_sq,
    scale, H, Lq, Lk, dropout_p,
    HAS_KMASK: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    live = tl.load(HMASK + pid_bh) != 0
    kv_end = tl.where(live, tl.load(KVLEN + b), 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < Lq
    q_base = pid_bh.to(tl.int64) * Lq * BLOCK_D
    kv_base = pid_bh.to(tl.int64) * Lk * BLOCK_D
    q_off = q_base + offs_m[:, None] * BLOCK_D + offs_d[None, :]
    q_rows = offs_m < tl.where(live, Lq, 0)
    q = tl.load(Q + q_off, mask=q_rows[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=q_rows[:, None], other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=m_valid, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lay_base = b * lay_sb + h * lay_sh + pid_m * lay_sq
    for start_n in range(0, kv_end, BLOCK_N):
        if HAS_LAYOUT:
            keep = tl.load(LAYOUT + lay_base + start_n // BLOCK_N) != 0
        else:
            keep = True
        if keep:
            k, v, n_valid = _load_kv_block(
                K, V, KMASK, kv_base, b, start_n, Lk, HAS_KMASK, BLOCK_N, BLOCK_D
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(n_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROPOUT:
                offs_n = start_n + tl.arange(0, BLOCK_N)
                keep = _keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p)
                dp = tl.where(keep, dp, 0.0) / (1.0 - dropout_p)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=m_valid[:, None])


# ---------------------------------------------------------------------- launcher
def _prepare(q, k, v, key_padding_mask, head_mask, block_layout, block_size):
    """Validate inputs and build the int tensors the kernels read."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"k and v must be (B, H, Lk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if d not in HEAD_DIMS:
        raise ValueError(
            f"head dim {d} is not supported by the Triton kernel; use one of {HEAD_DIMS}"
        )
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
    lk = k.shape[2]
    dev = q.device
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, lk):
            raise ValueError(
                f"key_padding_mask must be (B, Lk) = {(b, lk)}, got {tuple(key_padding_mask.shape)}"
            )
        kmask = key_padding_mask.to(dev, torch.int8).contiguous()
        pos = torch.arange(1, lk + 1, device=dev, dtype=torch.int32)
        kvlen = (
            (kmask.to(torch.int32) * pos).amax(dim=1).to(torch.int32).contiguous()
        )  # last real key + 1
    else:
        kmask = torch.ones(1, dtype=torch.int8, device=dev)
        kvlen = torch.full((b,), lk, dtype=torch.int32, device=dev)
    if head_mask is None:
        hmask = torch.ones(b * h, dtype=torch.int8, device=dev)
    else:
        hm = head_mask.to(dev)
        if hm.shape not in ((h,), (b, h)):
            raise ValueError(
                f"head_mask must be (H,) = ({h},) or (B, H) = {(b, h)}, got {tuple(hm.shape)}"
            )
        hmask = (hm != 0).to(torch.int8).expand(b, h).contiguous().view(-1)
    n_qb, n_kb = triton.cdiv(lq, block_size), triton.cdiv(lk, block_size)
    if block_layout is not None:
        lay = block_layout.to(dev)
        if lay.shape[-2:] != (n_qb, n_kb) or lay.dim() not in (2, 3, 4):
            raise ValueError(
                f"block_layout must end in (query blocks, key blocks) = {(n_qb, n_kb)} for block_size "
                f"{block_size}, with optional leading (H,) or (B, H); got {tuple(lay.shape)}"
            )
        while lay.dim() < 4:
            lay = lay.unsqueeze(0)
        lay = (lay != 0).to(torch.int8).expand(b, h, n_qb, n_kb)
        lay_strides = (lay.stride(0), lay.stride(1), lay.stride(2))  # last dim is contiguous
    else:
        lay, lay_strides = torch.ones(1, dtype=torch.int8, device=dev), (0, 0, 0)
    return kmask, kvlen, hmask, lay, lay_strides


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _seed(seed: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The call's dropout seed as a 1-element int64 tensor on ``device``: given, or drawn from
    torch's generator of that device (reproducible under ``torch.manual_seed``, and resumed
    with the generator's state; on CUDA no host synchronisation)."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return seed.reshape(1).to(device, torch.int64)


def dropout_keep_mask(
    seed: torch.Tensor, b: int, h: int, lq: int, lk: int, dropout_p: float
) -> torch.Tensor:
    """The keep mask ``(B, H, Lq, Lk)`` bool that the kernels apply for ``seed`` and
    ``dropout_p`` (the same Philox numbers): what a reference needs to reproduce a call.

    Example::

        out = flash_attention(q, k, v, dropout_p=0.1, seed=seed)
        keep = dropout_keep_mask(seed, *q.shape[:3], k.shape[2], 0.1)
        ref = attention_reference(q, k, v, dropout_p=0.1, dropout_mask=keep)
    """
    keep = torch.empty(b * h, lq, lk, dtype=torch.int8, device=seed.device)
    grid = (triton.cdiv(lq, 16), triton.cdiv(lk, 16), b * h)
    _keep_mask_kernel[grid](seed.reshape(1), keep, lq, lk, float(dropout_p),
                            BLOCK_M=16, BLOCK_N=16)  # fmt: skip
    return keep.view(b, h, lq, lk).bool()


class FlashAttentionFunction(torch.autograd.Function):
    """``torch.autograd.Function`` around the forward and backward kernels."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, head_mask, block_layout, block_size, scale,
                dropout_p=0.0, seed=None):  # noqa: D102  # fmt: skip
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        b, h, lq, d = q.shape
        lk = k.shape[2]
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
        kmask, kvlen, hmask, lay, ls = _prepare(
            q, k, v, key_padding_mask, head_mask, block_layout, block_size
        )
        if dropout_p > 0:
            seed_t = _seed(seed, q.device)
        else:
            seed_t = torch.zeros(1, dtype=torch.int64, device=q.device)
        o = torch.empty_like(q)
        lse = torch.empty(b, h, lq, dtype=torch.float32, device=q.device)
        bm = bn = block_size
        grid = (triton.cdiv(lq, bm), b * h)
        _fwd_kernel[grid](
            q, k, v, o, lse, kmask, kvlen, hmask, lay, seed_t, *ls, scale, h, lq, lk,
            float(dropout_p),
            HAS_KMASK=key_padding_mask is not None, HAS_LAYOUT=block_layout is not None,
            HAS_DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse, kmask, kvlen, hmask, lay, seed_t)
        ctx.meta = (ls, scale, block_size, key_padding_mask is not None, block_layout is not None,
                    float(dropout_p))  # fmt: skip
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: D102
        q, k, v, o, lse, kmask, kvlen, hmask, lay, seed_t = ctx.saved_tensors
        ls, scale, block_size, has_kmask, has_layout, dropout_p = ctx.meta
        do = do.contiguous()
        b, h, lq, d = q.shape
        lk = k.shape[2]
        delta = (do.float() * o.float()).sum(-1).contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = dict(
            HAS_KMASK=has_kmask, HAS_LAYOUT=has_layout, HAS_DROPOUT=dropout_p > 0,
            PRECISION=_precision(q.dtype), BLOCK_M=block_size, BLOCK_N=block_size, BLOCK_D=d,
        )  # fmt: skip
        masks = (kmask, kvlen, hmask, lay, seed_t, *ls, scale, h, lq, lk, dropout_p)
        _bwd_dkdv_kernel[(triton.cdiv(lk, block_size), b * h)](
            q, k, v, do, lse, delta, dk, dv, *masks, **common
        )
        _bwd_dq_kernel[(triton.cdiv(lq, block_size), b * h)](
            q, k, v, do, lse, delta, dq, *masks, **common
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    block_layout: torch.Tensor | None = None,
    block_size: int = 64,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused attention (Triton). Shapes and semantics as in
    :func:`vlcompress.kernels.reference.attention_reference`; returns ``(B, H, Lq, D)``.

    ``dropout_p`` drops attention probabilities inside the kernel (after the softmax, the
    survivors scaled by ``1 / (1 - p)``, as ``F.scaled_dot_product_attention``); the backward
    regenerates the same mask from ``seed`` (a 1-element int64 tensor; default: drawn from
    torch's generator of q's device, so ``torch.manual_seed`` makes a run repeatable).
    :func:`dropout_keep_mask` gives the mask of a seed.

    Raises:
        ValueError: for unsupported shapes, head dims, block sizes, mask shapes or dropout.
    """
    return FlashAttentionFunction.apply(
        q, k, v, key_padding_mask, head_mask, block_layout, block_size, scale, dropout_p, seed
    )


class FlashAttention(torch.nn.Module):
    """Module form of :func:`flash_attention`.

    Args:
        block_size: query/key block size (and the granularity of ``block_layout``).
        scale: softmax scale (default ``1/sqrt(head_dim)``).
    """

    def __init__(self, block_size: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        self.block_size, self.scale = block_size, scale

    def forward(
        self, q, k, v, key_padding_mask=None, head_mask=None, block_layout=None
    ) -> torch.Tensor:  # noqa: D102
        return flash_attention(
            q, k, v, key_padding_mask, head_mask, block_layout, self.block_size, self.scale
        )
