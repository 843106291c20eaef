"""The Triton kernels of the fused attention (launchers and autograd in
:mod:`vlcompress.kernels.flash_attention`).

Every kernel addresses its tensors per sequence: sequence ``b``'s rows start at element
``QOFF[b]`` (queries, outputs and their gradients) or ``KOFF[b]`` (keys, values and theirs), head
``h`` adds ``h * s*_h`` and row ``m`` adds ``m * s*_m``. The padded layout ``(B, H, L, D)`` and the
packed (varlen) layout ``(total, H, D)`` are the same kernels with other offsets and strides.
Per sequence, ``QLEN[b]`` query rows are computed and stored (a dead head stores zeros),
``KVLEN[b]`` keys are read (one past the last real key) and ``KROWS[b]`` key rows get gradients
(zeros past ``KVLEN[b]``). The row statistics (log-sum-exp, ``delta``)
have the queries' layout without the head dim.

Attention dropout uses Philox (``tl.rand``) keyed by the call's seed and the (batch, head) index
and counted by ``query * Lk + key`` within the sequence (``Lk`` the longest key sequence), so the
forward, both backward kernels and :func:`_keep_mask_kernel` draw the same numbers.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []  # private kernels: use vlcompress.kernels.flash_attention


@triton.jit
def _keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p):
    """Which (query, key) pairs of a block survive dropout. Philox's 64-bit key is
    ``seed * 2**24 + (batch, head) index`` (seeds below 2**40, fewer than 2**24 pairs), so no two
    (seed, pair) share a stream, even for consecutive seeds."""
    seed = tl.load(SEED) * 16777216 + pid_bh
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
def _key_valid(KMASK, b, offs_n, kv_len, Lk, HAS_KMASK: tl.constexpr):
    """Keys of the block that are real: before the sequence's end and not padding."""
    valid = offs_n < kv_len
    if HAS_KMASK:
        valid = valid & (tl.load(KMASK + b * Lk + offs_n, mask=valid, other=0) != 0)
    return valid


@triton.jit
def _kv_block(K, V, KMASK, k_base, b, start_n, kv_len, Lk, sk_n, offs_d,
              HAS_KMASK: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The keys and values of the block at ``start_n`` and which of its keys are real."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_valid = _key_valid(KMASK, b, offs_n, kv_len, Lk, HAS_KMASK)
    kv_off = k_base + offs_n[:, None] * sk_n + offs_d[None, :]
    k = tl.load(K + kv_off, mask=(offs_n < kv_len)[:, None], other=0.0)
    v = tl.load(V + kv_off, mask=(offs_n < kv_len)[:, None], other=0.0)
    return offs_n, k, v, n_valid


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, QOFF, KOFF, QLEN, KVLEN, KMASK, HMASK, LAYOUT, SEED,
    sq_h, sq_m, sk_h, sk_n, st_h, st_m,
    lay_sb, lay_sh, lay_sq,
    scale, H, Lk, dropout_p,
    HAS_KMASK: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    live = tl.load(HMASK + pid_bh) != 0
    q_len = tl.where(live, tl.load(QLEN + b), 0)  # a dead head computes nothing
    q_rows = tl.load(QLEN + b)
    start_m = pid_m * BLOCK_M
    kv_len = tl.load(KVLEN + b)
    kv_end = tl.where(start_m < q_len, kv_len, 0)  # a block of padded queries reads no key
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptr = Q + tl.load(QOFF + b) + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :]
    q = tl.load(q_ptr, mask=(offs_m < q_len)[:, None], other=0.0)
    k_base = tl.load(KOFF + b) + h * sk_h
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
            offs_n, k, v, n_valid = _kv_block(K, V, KMASK, k_base, b, start_n, kv_len, Lk, sk_n,
                                              offs_d, HAS_KMASK, BLOCK_N)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(n_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)  # the softmax normaliser sees every key
            if HAS_DROPOUT:
                p = tl.where(_keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p), p, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    stored = offs_m < q_rows
    o_ptr = OUT + tl.load(QOFF + b) + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=stored[:, None])
    st_ptr = LSE + tl.load(QOFF + b) // BLOCK_D + h * st_h + offs_m * st_m
    tl.store(st_ptr, lse, mask=stored)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    QOFF, KOFF, QLEN, KROWS, KVLEN, KMASK, HMASK, LAYOUT, SEED,
    sq_h, sq_m, sk_h, sk_n, st_h, st_m,
    lay_sb, lay_sh, lay_sq,
    scale, H, Lk, dropout_p,
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
    kv_len = tl.load(KVLEN + b)
    active = live & (start_n < kv_len)
    q_len = tl.load(QLEN + b)
    q_end = tl.where(active, q_len, 0)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = _key_valid(KMASK, b, offs_n, kv_len, Lk, HAS_KMASK)
    kv_off = tl.load(KOFF + b) + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :]
    rows = (offs_n < tl.where(active, kv_len, 0))[:, None]  # dead heads load nothing
    k = tl.load(K + kv_off, mask=rows, other=0.0)
    v = tl.load(V + kv_off, mask=rows, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_base = tl.load(QOFF + b) + h * sq_h
    st_base = tl.load(QOFF + b) // BLOCK_D + h * st_h
    lay_base = b * lay_sb + h * lay_sh + pid_n
    for start_m in range(0, q_end, BLOCK_M):
        if HAS_LAYOUT:
            keep = tl.load(LAYOUT + lay_base + (start_m // BLOCK_M) * lay_sq) != 0
        else:
            keep = True
        if keep:
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_valid = offs_m < q_len
            q_off = q_base + offs_m[:, None] * sq_m + offs_d[None, :]
            q = tl.load(Q + q_off, mask=m_valid[:, None], other=0.0)
            do = tl.load(DO + q_off, mask=m_valid[:, None], other=0.0)
            lse = tl.load(LSE + st_base + offs_m * st_m, mask=m_valid, other=float("inf"))
            delta = tl.load(DELTA + st_base + offs_m * st_m, mask=m_valid, other=0.0)
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
    stored = (offs_n < tl.load(KROWS + b))[:, None]
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=stored)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=stored)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    QOFF, KOFF, QLEN, KVLEN, KMASK, HMASK, LAYOUT, SEED,
    sq_h, sq_m, sk_h, sk_n, st_h, st_m,
    lay_sb, lay_sh, lay_sq,
    scale, H, Lk, dropout_p,
    HAS_KMASK: tl.constexpr, HAS_LAYOUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    live = tl.load(HMASK + pid_bh) != 0
    q_len = tl.where(live, tl.load(QLEN + b), 0)
    start_m = pid_m * BLOCK_M
    kv_len = tl.load(KVLEN + b)
    kv_end = tl.where(start_m < q_len, kv_len, 0)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = offs_m < q_len
    q_off = tl.load(QOFF + b) + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :]
    q = tl.load(Q + q_off, mask=m_valid[:, None], other=0.0)
    do = tl.load(DO + q_off, mask=m_valid[:, None], other=0.0)
    st_ptr = tl.load(QOFF + b) // BLOCK_D + h * st_h + offs_m * st_m
    lse = tl.load(LSE + st_ptr, mask=m_valid, other=float("inf"))
    delta = tl.load(DELTA + st_ptr, mask=m_valid, other=0.0)
    k_base = tl.load(KOFF + b) + h * sk_h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lay_base = b * lay_sb + h * lay_sh + pid_m * lay_sq
    for start_n in range(0, kv_end, BLOCK_N):
        if HAS_LAYOUT:
            keep = tl.load(LAYOUT + lay_base + start_n // BLOCK_N) != 0
        else:
            keep = True
        if keep:
            offs_n, k, v, n_valid = _kv_block(K, V, KMASK, k_base, b, start_n, kv_len, Lk, sk_n,
                                              offs_d, HAS_KMASK, BLOCK_N)  # fmt: skip
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(n_valid[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if HAS_DROPOUT:
                keep = _keep(SEED, pid_bh, offs_m, offs_n, Lk, dropout_p)
                dp = tl.where(keep, dp, 0.0) / (1.0 - dropout_p)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    stored = (offs_m < tl.load(QLEN + b))[:, None]
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=stored)
