"""Fused attention for short, ragged VL sequences: launchers, autograd and the public functions
around the Triton kernels of :mod:`vlcompress.kernels.flash_attention_kernels`.

Forward (online softmax, FlashAttention-2 style) and backward (one kernel for dK/dV over key
blocks, one for dQ over query blocks) with:

* self- and cross-attention (``Lq != Lk``);
* two layouts: padded ``(B, H, L, D)`` (:func:`flash_attention`) and packed (varlen)
  ``(total, H, D)`` with cumulative sequence lengths (:func:`flash_attention_varlen`), where
  padded queries and keys cost nothing at all;
* key padding: each sequence's loop stops after its last real key, so padding costs nothing
  beyond the block it sits in; padded keys inside that block are masked;
* dead heads (``head_mask`` per head or per batch-and-head): their programs load nothing and
  write zeros, so they cost one launch slot and give zero output and zero gradients;
* a block-sparse layout: query block ``i`` visits key block ``j`` only where the layout is set;
* attention dropout drawn inside the kernels (Philox; the backward regenerates the mask);
* head dims 16, 32, 64, 128; fp16 / bf16 on GPU, fp32 everywhere (``TRITON_INTERPRET=1``);
* a cheap launch: no host-device synchronisation (varlen: given ``max_seqlen_*``), the
  shape-only tensors of a launch cached (bounded LRU), and no autograd node when no gradient
  is wanted.

Semantics are those of :func:`vlcompress.kernels.reference.attention_reference`, including
zeros for query rows that see no key.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch
import triton

from vlcompress.kernels.flash_attention_kernels import (
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _fwd_kernel,
    _keep_mask_kernel,
)
from vlcompress.kernels.flash_attention_limits import BLOCK_SIZES, HEAD_DIMS

__all__ = ["LaunchConfig", "dropout_keep_mask", "flash_attention", "flash_attention_varlen"]
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- cached constants
_CACHE_SIZE = 64
"""At most this many shape-only constant sets are kept (least recently used evicted)."""


def _build_constants(key: tuple) -> tuple[torch.Tensor, ...]:
    """The tensors of a constant key (see :func:`_constants`), as normal tensors even when
    first asked for under ``torch.inference_mode`` (a validation pass): a later training call
    saves some of them for its backward."""
    with torch.inference_mode(False):
        return _make_constants(key)


def _make_constants(key: tuple) -> tuple[torch.Tensor, ...]:
    kind, dev = key[0], key[-1]
    if kind == "padded":  # per-sequence offsets and lengths, key positions 1..Lk
        _, b, h, lq, lk, d, _ = key
        seq = torch.arange(b, device=dev, dtype=torch.int64)
        pos = torch.arange(1, lk + 1, device=dev, dtype=torch.int32)
        qlen = torch.full((b,), lq, dtype=torch.int32, device=dev)
        krows = torch.full((b,), lk, dtype=torch.int32, device=dev)
        return seq * (h * lq * d), seq * (h * lk * d), qlen, krows, pos
    if kind == "ones":  # a live-everywhere head mask of n (batch, head) pairs
        return (torch.ones(key[1], dtype=torch.int8, device=dev),)
    if kind == "device":  # the placeholder of absent masks, the zero seed, [0, 1] per int dtype
        return (
            torch.ones(1, dtype=torch.int8, device=dev),
            torch.zeros(1, dtype=torch.int64, device=dev),
            torch.arange(2, dtype=torch.int32, device=dev),  # no host copy: capturable
            torch.arange(2, dtype=torch.int64, device=dev),
        )
    raise KeyError(key)


_cached_constants = functools.lru_cache(maxsize=_CACHE_SIZE)(_build_constants)


def _constants(*key) -> tuple[torch.Tensor, ...]:
    """Read-only tensors that depend only on shapes and the device (the last key entry), built
    once and kept in a bounded LRU cache: ``("padded", b, h, lq, lk, d, dev)`` -> (qoff, koff,
    qlen, krows, key positions), ``("ones", n, dev)`` -> (an all-live head mask,),
    ``("device", dev)`` -> (mask placeholder, zero seed, ``[0, 1]`` int32, ``[0, 1]`` int64).

    Nothing may write them: the kernels only read them and no output aliases one. Under CUDA
    graph capture they are built fresh and not cached (a tensor made during capture holds
    nothing until the graph replays, and an evicted one would free memory the graph reads).
    """
    if _capturing(key[-1]):
        return _build_constants(key)
    return _cached_constants(key)


def _capturing(dev: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``dev``'s current stream."""
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


# ---------------------------------------------------------------------- launch plans
@dataclass
class _Plan:
    """Everything the kernels read besides q, k, v: per-sequence offsets and lengths, masks,
    strides (in elements) and the grid sizes."""

    qoff: torch.Tensor
    koff: torch.Tensor
    qlen: torch.Tensor
    kvlen: torch.Tensor
    krows: torch.Tensor
    kmask: torch.Tensor
    hmask: torch.Tensor
    lay: torch.Tensor
    lay_strides: tuple[int, int, int]
    strides: tuple[int, int, int, int, int, int]  # sq_h, sq_m, sk_h, sk_n, st_h, st_m
    b: int
    h: int
    max_q: int
    max_k: int
    has_kmask: bool
    has_layout: bool


def _check_head_dim(d: int, block_size: int | None) -> None:
    if d not in HEAD_DIMS:
        raise ValueError(
            f"head dim {d} is not supported by the Triton kernel; use one of {HEAD_DIMS}"
        )
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")


def _as_int8(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask as int8 (nonzero = 1): a bool mask is reinterpreted in place, no copy."""
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.view(torch.int8)


def _head_mask(head_mask: torch.Tensor | None, b: int, h: int, dev: torch.device) -> torch.Tensor:
    """The live flag of every (batch, head) pair: ``B * H`` contiguous int8."""
    if head_mask is None:
        return _constants("ones", b * h, dev)[0]
    hm = head_mask.to(dev)
    if hm.shape not in ((h,), (b, h)):
        raise ValueError(
            f"head_mask must be (H,) = ({h},) or (B, H) = {(b, h)}, got {tuple(hm.shape)}"
        )
    if hm.dim() == 1 and b > 1:
        hm = hm.expand(b, h)
    if hm.dtype != torch.bool:
        hm = hm != 0
    return hm.contiguous().view(torch.int8)  # row-major (B, H), as the kernels read it


def _padded_plan(q, k, v, key_padding_mask, head_mask, block_layout, block_size) -> _Plan:
    """Validate padded inputs ``(B, H, L, D)`` and build their plan."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, h, lq, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"k and v must be (B, H, Lk, D) matching q {tuple(q.shape)}; got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_head_dim(d, block_size)
    lk = k.shape[2]
    dev = q.device
    qoff, koff, qlen, krows, pos = _constants("padded", b, h, lq, lk, d, dev)
    placeholder = _constants("device", dev)[0]
    if block_layout is not None and block_size is None:
        block_size = 64
    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, lk):
            raise ValueError(
                f"key_padding_mask must be (B, Lk) = {(b, lk)}, got {tuple(key_padding_mask.shape)}"
            )
        kmask = _as_int8(key_padding_mask.to(dev)).contiguous()
        kvlen = (kmask * pos).amax(dim=1)  # one past the last real key (int32)
    else:
        kmask, kvlen = placeholder, krows
    if block_layout is not None:
        n_qb, n_kb = triton.cdiv(lq, block_size), triton.cdiv(lk, block_size)
        lay = block_layout.to(dev)
        if lay.shape[-2:] != (n_qb, n_kb) or lay.dim() not in (2, 3, 4):
            raise ValueError(
                f"block_layout must end in (query blocks, key blocks) = {(n_qb, n_kb)} for block_size "
                f"{block_size}, with optional leading (H,) or (B, H); got {tuple(lay.shape)}"
            )
        lay = _as_int8(lay.contiguous())
        lay = lay.view((1,) * (4 - lay.dim()) + tuple(lay.shape)).expand(b, h, n_qb, n_kb)
        lay_strides = (lay.stride(0), lay.stride(1), lay.stride(2))  # last dim is contiguous
    else:
        lay, lay_strides = placeholder, (0, 0, 0)
    return _Plan(
        qoff=qoff, koff=koff, qlen=qlen, kvlen=kvlen, krows=krows,
        kmask=kmask, hmask=_head_mask(head_mask, b, h, dev), lay=lay, lay_strides=lay_strides,
        strides=(lq * d, d, lk * d, d, lq, 1), b=b, h=h, max_q=lq, max_k=lk,
        has_kmask=key_padding_mask is not None, has_layout=block_layout is not None,
    )  # fmt: skip


def _validate_on_host(cu: torch.Tensor) -> bool:
    """Whether the values of cumulative lengths are checked on the host: only where reading
    them costs no device synchronisation (a CPU tensor). Elsewhere they are checked on the
    device (``torch._assert_async``) unless the host must read them anyway."""
    return cu.device.type == "cpu"


def _check_cu_layout(cu: torch.Tensor, what: str) -> None:
    """dtype and shape of cumulative lengths (no read of their values)."""
    if cu.dim() != 1 or len(cu) < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{what} must be a 1-D int32/int64 tensor of B + 1 cumulative lengths starting at "
            f"0 (e.g. [0, 14, 23]), got {cu.dtype} {tuple(cu.shape)}"
        )


def _host_values(cus: list[torch.Tensor]) -> list[list[int]]:
    """The values of the cumulative lengths ``cus`` as lists: free for CPU tensors, one
    device synchronisation for the others together."""
    on_device = [i for i, c in enumerate(cus) if not _validate_on_host(c)]
    if len(on_device) < 2:
        return [c.tolist() for c in cus]
    flat = torch.cat([cus[i].to(cus[on_device[0]].device, torch.int64)
                      for i in on_device]).tolist()  # fmt: skip
    out = [[] if i in on_device else c.tolist() for i, c in enumerate(cus)]
    for i in on_device:
        out[i], flat = flat[: len(cus[i])], flat[len(cus[i]) :]
    return out


def _check_on_host(values: list[int], total: int, max_len: int | None, what: str) -> int:
    """Check cumulative lengths read on the host; return the longest sequence."""
    lengths = [b - a for a, b in zip(values, values[1:])]
    if values[0] != 0 or values[-1] != total or min(lengths) < 0:
        raise ValueError(
            f"{what} must start at 0, never decrease and end at the packed length {total}; "
            f"got {values if len(values) <= 10 else values[:10] + ['...']}"
        )
    longest = max(lengths)
    if max_len is not None and max_len < longest:
        side = "query" if what.endswith("_q") else "key"
        raise ValueError(
            f"max_seqlen_{what[-1]} {max_len} is shorter than the longest {side} sequence "
            f"({longest}); pass at least that, or None"
        )
    return longest


def _check_on_device(cu: torch.Tensor, lengths: torch.Tensor, total: int, max_len: int,
                     what: str) -> None:  # fmt: skip
    """Check cumulative lengths on their device without reading them: a bad tensor fails the
    stream asynchronously (a ``RuntimeError`` at the next synchronisation; on CUDA a
    device-side assert, after which the CUDA context is unusable)."""
    ok = lengths.clamp(0, max_len).eq(lengths).all()
    torch._assert_async(
        ok, f"{what} must never decrease and hold no sequence longer than {max_len}"
    )
    ends = cu[:: len(cu) - 1]  # [cu[0], cu[-1]], a view
    zero_one = _constants("device", cu.device)[2 if cu.dtype == torch.int32 else 3]
    ok = torch.sub(ends, zero_one, alpha=total).eq(0).all()  # [cu[0], cu[-1] - total] == 0
    torch._assert_async(ok, f"{what} must start at 0 and end at the packed length {total}")


def _sequences(cu, values, total, max_len, row, dev, what):
    """Per-sequence lengths (int32), element offsets (int64, ``row`` elements a position) and
    the longest length of cumulative lengths ``cu``; ``values`` are its values when read on
    the host (then checked there), else ``None`` (checked on the device)."""
    longest = _check_on_host(values, total, max_len, what) if values is not None else max_len
    longest = longest if max_len is None else max_len  # the grid and the dropout use max_len
    cu = cu.to(dev, non_blocking=True)  # a host tensor: staged, the host does not wait
    lengths = cu[1:] - cu[:-1]
    if values is None:
        _check_on_device(cu, lengths, total, max_len, what)
    if lengths.dtype != torch.int32:
        lengths = lengths.to(torch.int32)
    return lengths, cu[:-1].to(torch.int64) * row, longest


def _packed_plan(q, k, v, cu_q, cu_k, max_q, max_k, head_mask, block_size) -> _Plan:
    """Validate packed inputs ``(total, H, D)`` with cumulative lengths and build their plan.

    With ``max_q`` and ``max_k`` given and cumulative lengths on the GPU nothing is read on
    the host (the values are checked on the device); a ``None`` one is read (one
    synchronisation for both). CPU cumulative lengths are checked on the host."""
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"packed q, k, v must be (total, H, D); got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    _, h, d = q.shape
    if k.shape != v.shape or k.shape[1:] != (h, d):
        raise ValueError(
            f"packed k and v must be (total_k, H, D) matching q {tuple(q.shape)}; got "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    _check_head_dim(d, block_size)
    _check_cu_layout(cu_q, "cu_seqlens_q")
    _check_cu_layout(cu_k, "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k describe {len(cu_q) - 1} and {len(cu_k) - 1} "
            "sequences; give one query and one key sequence per batch element"
        )
    dev, b = q.device, len(cu_q) - 1
    shared = cu_k is cu_q and k.shape[0] == q.shape[0] and max_k == max_q  # self-attention
    cus = [cu_q] if shared else [cu_q, cu_k]
    maxes = [max_q] if shared else [max_q, max_k]
    read = [m is None or _validate_on_host(c) for c, m in zip(cus, maxes)]
    values = iter(_host_values([c for c, r in zip(cus, read) if r]))
    host = [next(values) if r else None for r in read]
    qlen, qoff, max_q = _sequences(cu_q, host[0], q.shape[0], max_q, h * d, dev, "cu_seqlens_q")
    if shared:
        klen, koff, max_k = qlen, qoff, max_q
    else:
        klen, koff, max_k = _sequences(cu_k, host[1], k.shape[0], max_k, h * d, dev,
                                       "cu_seqlens_k")  # fmt: skip
    placeholder = _constants("device", dev)[0]
    return _Plan(
        qoff=qoff, koff=koff, qlen=qlen, kvlen=klen, krows=klen,
        kmask=placeholder, hmask=_head_mask(head_mask, b, h, dev),
        lay=placeholder, lay_strides=(0, 0, 0),
        strides=(d, h * d, d, h * d, 1, h), b=b, h=h, max_q=max(int(max_q), 1),
        max_k=max(int(max_k), 1), has_kmask=False, has_layout=False,
    )  # fmt: skip


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------- launch configurations
@dataclass(frozen=True)
class LaunchConfig:
    """Block size (queries and keys), warps and pipeline stages of one launch."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 2


CANDIDATES = (
    LaunchConfig(32, 4, 2), LaunchConfig(64, 4, 2), LaunchConfig(64, 4, 3),
    LaunchConfig(64, 8, 2), LaunchConfig(128, 8, 2), LaunchConfig(128, 8, 3),
)  # fmt: skip
"""The configurations tried for a new shape (those that do not compile or fit are skipped)."""

_TUNED: dict[tuple, LaunchConfig] = {}
"""Chosen configuration per (longest query, longest key, head dim, dtype, device, packed)."""


def _should_tune(q: torch.Tensor) -> bool:
    """Tune on a real GPU only (the interpreter runs any block size alike)."""
    return q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def _time_config(cfg: LaunchConfig, run) -> float:
    """Milliseconds of ``run(cfg)`` (a forward and a backward), by ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    return float(do_bench(lambda: run(cfg), warmup=5, rep=20))


def _launch_config(plan: _Plan, q, k, v, block_size: int | None) -> LaunchConfig:
    """The launch configuration of a call: ``block_size`` when given (and always with a block
    layout, whose granularity it is), else the fastest forward of :data:`CANDIDATES` for this
    (Lq, Lk, D, dtype), measured once per process on the GPU and cached in :data:`_TUNED`
    (64-blocks elsewhere). Both the forward and the backward run with the chosen one."""
    if block_size is not None or plan.has_layout:
        return LaunchConfig(block_size or 64)
    if not _should_tune(q):
        return LaunchConfig()
    # lengths rounded up to 32: ragged batches padded to their own maximum share a measurement
    key = (-(-plan.max_q // 32), -(-plan.max_k // 32), q.shape[-1], q.dtype, q.device,
           q.dim() == 3)  # fmt: skip
    if key not in _TUNED:
        scale = 1.0 / math.sqrt(q.shape[-1])
        seed = torch.zeros(1, dtype=torch.int64, device=q.device)

        def run(c: LaunchConfig) -> None:  # forward and backward: a config must fit both
            o, lse = _forward(plan, q, k, v, scale, 0.0, seed, c)
            _backward(plan, q, k, v, o, lse, torch.ones_like(o), scale, 0.0, seed, c)

        times = {}
        for cfg in CANDIDATES:
            try:
                times[cfg] = _time_config(cfg, run)
            except Exception as e:  # out of shared memory / registers for this shape
                log.debug("attention config %s skipped: %s", cfg, e)
        _TUNED[key] = min(times, key=times.get) if times else LaunchConfig()
        log.info("attention launch config for Lq %d, Lk %d, D %d, %s: %s",
                 plan.max_q, plan.max_k, q.shape[-1], q.dtype, _TUNED[key])  # fmt: skip
    return _TUNED[key]


def _seed(seed: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The call's dropout seed as a 1-element int64 tensor on ``device``: given, or drawn from
    torch's generator of that device (reproducible under ``torch.manual_seed``, and resumed
    with the generator's state; on CUDA no host synchronisation)."""
    if seed is None:
        return torch.randint(0, SEED_LIMIT, (1,), dtype=torch.int64, device=device)
    return seed.reshape(1).to(device, torch.int64)


SEED_LIMIT = 2**40
"""Dropout seeds are in ``[0, SEED_LIMIT)`` (the Philox key also holds the (batch, head) index)."""


def dropout_keep_mask(
    seed: torch.Tensor, b: int, h: int, lq: int, lk: int, dropout_p: float
) -> torch.Tensor:
    """The keep mask ``(B, H, Lq, Lk)`` bool that the kernels apply for ``seed`` and
    ``dropout_p`` (the same Philox numbers): what a reference needs to reproduce a call. For a
    packed call, ``lq`` / ``lk`` are the longest sequences and entry ``[b, h, m, n]`` belongs to
    the ``m``-th query and ``n``-th key of sequence ``b``.

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


# ---------------------------------------------------------------------- launchers
def _launch_kwargs(q: torch.Tensor, cfg: LaunchConfig) -> dict[str, int]:
    """Block sizes, and warps / stages on a GPU (the interpreter takes none)."""
    out = {"BLOCK_M": cfg.block, "BLOCK_N": cfg.block}
    if q.is_cuda:
        out.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _forward(plan: _Plan, q, k, v, scale, dropout_p, seed_t, cfg: LaunchConfig):
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(plan.max_q, cfg.block), plan.b * plan.h)
    _fwd_kernel[grid](
        q, k, v, o, lse, plan.qoff, plan.koff, plan.qlen, plan.kvlen,
        plan.kmask, plan.hmask, plan.lay, seed_t, *plan.strides, *plan.lay_strides,
        scale, plan.h, plan.max_k, float(dropout_p),
        HAS_KMASK=plan.has_kmask, HAS_LAYOUT=plan.has_layout, HAS_DROPOUT=dropout_p > 0,
        PRECISION=_precision(q.dtype), BLOCK_D=q.shape[-1], **_launch_kwargs(q, cfg),
    )  # fmt: skip
    return o, lse


def _backward(plan: _Plan, q, k, v, o, lse, do, scale, dropout_p, seed_t, cfg: LaunchConfig):
    # the row statistic delta = rowsum(dO * O) in fp32 (a mixed-dtype product: one cast only)
    delta = (do.float() * o).sum(-1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = dict(
        HAS_KMASK=plan.has_kmask, HAS_LAYOUT=plan.has_layout, HAS_DROPOUT=dropout_p > 0,
        PRECISION=_precision(q.dtype), BLOCK_D=q.shape[-1], **_launch_kwargs(q, cfg),
    )  # fmt: skip
    tail = (*plan.strides, *plan.lay_strides, scale, plan.h, plan.max_k, float(dropout_p))
    _bwd_dkdv_kernel[(triton.cdiv(plan.max_k, cfg.block), plan.b * plan.h)](
        q, k, v, do, lse, delta, dk, dv, plan.qoff, plan.koff, plan.qlen, plan.krows,
        plan.kvlen, plan.kmask, plan.hmask, plan.lay, seed_t, *tail, **common,
    )  # fmt: skip
    _bwd_dq_kernel[(triton.cdiv(plan.max_q, cfg.block), plan.b * plan.h)](
        q, k, v, do, lse, delta, dq, plan.qoff, plan.koff, plan.qlen,
        plan.kvlen, plan.kmask, plan.hmask, plan.lay, seed_t, *tail, **common,
    )  # fmt: skip
    return dq, dk, dv


def _run_forward(q, k, v, plan: _Plan, scale, dropout_p, seed, block_size):
    """Check the dropout, pick the launch configuration and run the forward: ``(o, lse,
    seed_t, (scale, dropout_p, cfg))`` for q, k, v already contiguous."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    cfg = _launch_config(plan, q, k, v, block_size)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if dropout_p > 0:
        seed_t = _seed(seed, q.device)
    else:
        seed_t = _constants("device", q.device)[1]  # read by no kernel (no dropout)
    o, lse = _forward(plan, q, k, v, scale, dropout_p, seed_t, cfg)
    return o, lse, seed_t, (scale, float(dropout_p), cfg)


class _FlashAttention(torch.autograd.Function):
    """A thin ``autograd.Function`` over :func:`_forward` / :func:`_backward`."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scale, dropout_p, seed, block_size):  # noqa: D102
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse, seed_t, meta = _run_forward(q, k, v, plan, scale, dropout_p, seed, block_size)
        ctx.save_for_backward(q, k, v, o, lse, seed_t)
        ctx.plan, ctx.meta = plan, meta
        return o

    @staticmethod
    def backward(ctx, do):  # noqa: D102
        q, k, v, o, lse, seed_t = ctx.saved_tensors
        scale, dropout_p, cfg = ctx.meta
        grads = _backward(ctx.plan, q, k, v, o, lse, do.contiguous(), scale, dropout_p, seed_t,
                          cfg)  # fmt: skip
        return (*grads, None, None, None, None, None)


def _apply(q, k, v, plan: _Plan, scale, dropout_p, seed, block_size) -> torch.Tensor:
    """Through autograd when a gradient is wanted, else the forward alone (no graph node)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _FlashAttention.apply(q, k, v, plan, scale, dropout_p, seed, block_size)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _run_forward(q, k, v, plan, scale, dropout_p, seed, block_size)[0]


# ---------------------------------------------------------------------- public functions
def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    block_layout: torch.Tensor | None = None,
    block_size: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused attention (Triton) over padded ``(B, H, L, D)`` tensors. Shapes and semantics as
    in :func:`vlcompress.kernels.reference.attention_reference`; returns ``(B, H, Lq, D)``.

    ``dropout_p`` drops attention probabilities inside the kernel (after the softmax, the
    survivors scaled by ``1 / (1 - p)``, as ``F.scaled_dot_product_attention``); the backward
    regenerates the same mask from ``seed`` (a 1-element int64 tensor; default: drawn from
    torch's generator of q's device, so ``torch.manual_seed`` makes a run repeatable).
    :func:`dropout_keep_mask` gives the mask of a seed. ``block_size``: the query / key block
    (and the granularity of ``block_layout``, 64 by default there); ``None`` elsewhere picks the
    fastest launch configuration for the shape, measured once per process on a GPU.

    Raises:
        ValueError: for unsupported shapes, head dims, block sizes, mask shapes or dropout.
    """
    plan = _padded_plan(q, k, v, key_padding_mask, head_mask, block_layout, block_size)
    return _apply(q, k, v, plan, scale, dropout_p, seed, block_size)


def flash_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    head_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused attention over packed sequences: ``q (total_q, H, D)``, ``k, v (total_k, H, D)``,
    sequence ``b`` being rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q and
    ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v (self-attention: the same
    ``cu_seqlens``; cross-attention: each side its own). No padding exists, so none is
    computed. Returns ``(total_q, H, D)``.

    ``max_seqlen_*``: the longest sequences, or longer (computed from ``cu_seqlens`` when
    ``None``, which reads them on the host: one synchronisation on a GPU). With both given
    and ``cu_seqlens`` on the GPU nothing is read on the host: the cumulative lengths are
    checked on the device (``torch._assert_async``), so bad ones fail at the next
    synchronisation, as a device-side assert. CPU ``cu_seqlens`` are checked on the host.
    Dead heads, dropout and the scale as in :func:`flash_attention` (:func:`dropout_keep_mask`
    with ``max_seqlen_*``). A sequence with no key outputs zeros.

    Raises:
        ValueError: for unsupported shapes or head dims, or bad cumulative lengths read on the
            host (on the device: a ``RuntimeError`` when the stream next synchronises).

    Example::

        cu = torch.tensor([0, 14, 23], dtype=torch.int32)     # two questions, 14 and 9 tokens
        out = flash_attention_varlen(q, k, v, cu, cu)          # q, k, v: (23, H, D)
    """
    plan = _packed_plan(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        head_mask, block_size)  # fmt: skip
    return _apply(q, k, v, plan, scale, dropout_p, seed, block_size)
