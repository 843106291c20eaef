"""Triton attention vs the torch reference (TRITON_INTERPRET=1 on the CPU): outputs and
gradients of q, k, v over odd shapes and every masking feature, alone and together."""

import os

import pytest
import torch

from vlcompress.kernels import attention, attention_reference

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from vlcompress.kernels.flash_attention import (  # noqa: E402
    dropout_keep_mask,
    flash_attention,
    flash_attention_varlen,
)
from vlcompress.kernels.modules import FlashAttention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def make(b, h, lq, lk, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype).requires_grad_()
        for n in (lq, lk, lk)
    ]


def check(b, h, lq, lk, d, block_size=16, dtype=torch.float32, **masks):
    q, k, v = make(b, h, lq, lk, d, dtype)
    out = flash_attention(q, k, v, block_size=block_size, **masks)
    ref = attention_reference(q, k, v, block_size=block_size, **masks)
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, e in zip("qkv", got, want):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol, msg=f"d{name}")
    return out, got


def key_mask(b, lk, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, lk + 1, (b,), generator=g)
    m = torch.arange(lk)[None, :] < lengths[:, None]
    m[0, 0] = lk == 1 or bool(m[0, 0])  # keep a real key first ...
    if lk > 2:
        m[0, 1] = False  # ... and a hole inside the sequence
    return m.to(DEVICE)


SHAPES = [(1, 1, 5, 7, 16), (2, 3, 20, 37, 16), (1, 2, 33, 17, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_plain(shape):
    check(*shape)


@pytest.mark.parametrize("shape", SHAPES)
def test_key_padding(shape):
    b, _, _, lk, _ = shape
    check(*shape, key_padding_mask=key_mask(b, lk))


def test_dead_heads_give_zero_output_and_gradient():
    b, h = 2, 3
    hm = torch.tensor([[1, 0, 1], [0, 1, 1]], device=DEVICE)
    out, (dq, dk, dv) = check(b, h, 20, 37, 16, head_mask=hm)
    dead = hm == 0
    assert out[dead].abs().max() == 0
    for grad in (dq, dk, dv):
        assert grad[dead].abs().max() == 0 and grad[~dead].abs().max() > 0
    check(b, h, 20, 37, 16, head_mask=torch.tensor([1, 0, 1], device=DEVICE))


def test_block_layout_per_head():
    b, h, lq, lk = 2, 2, 20, 37  # 2 x 3 blocks of 16
    layout = torch.tensor(
        [[[1, 0, 1], [0, 1, 1]], [[1, 1, 0], [1, 0, 0]]], dtype=torch.bool, device=DEVICE
    )
    check(b, h, lq, lk, 16, block_layout=layout)
    check(b, h, lq, lk, 16, block_layout=layout[0])  # shared by heads


def test_all_features_together():
    b, h, lq, lk = 3, 2, 18, 45
    check(
        b, h, lq, lk, 32,
        key_padding_mask=key_mask(b, lk, seed=4),
        head_mask=torch.tensor([[1, 1], [1, 0], [0, 1]], device=DEVICE),
        block_layout=torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool, device=DEVICE),
    )  # fmt: skip


def test_fully_masked_rows_are_zero_not_nan():
    b, h, lq, lk = 2, 2, 9, 21
    kpm = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    kpm[1] = False  # sequence 1 has no key at all
    out, grads = check(b, h, lq, lk, 16, key_padding_mask=kpm)
    assert out[1].abs().max() == 0 and all(torch.isfinite(g).all() for g in grads)
    # A layout that gives query block 1 no key block: those rows are zero too.
    out, _ = check(
        1,
        1,
        20,
        20,
        16,
        block_layout=torch.tensor([[1, 1], [0, 0]], dtype=torch.bool, device=DEVICE),
    )
    assert out[0, 0, 16:].abs().max() == 0


def test_dispatch_matches_on_both_backends():
    b, h, lq, lk = 2, 2, 11, 23
    q, k, v = make(b, h, lq, lk, 16)
    masks = dict(key_padding_mask=key_mask(b, lk), head_mask=torch.tensor([1, 0], device=DEVICE))
    ref = attention_reference(q, k, v, **masks)
    torch.testing.assert_close(
        attention(q, k, v, backend="sdpa", **masks), ref, rtol=2e-5, atol=2e-5
    )
    torch.testing.assert_close(
        attention(q, k, v, backend="triton", block_size=16, **masks), ref, rtol=2e-5, atol=2e-5
    )
    lay = torch.tensor([[1, 0]], dtype=torch.bool, device=DEVICE)
    ref = attention_reference(q, k, v, block_layout=lay, block_size=16, **masks)
    torch.testing.assert_close(
        attention(q, k, v, block_layout=lay, block_size=16, backend="sdpa", **masks), ref
    )


def test_module_and_bad_input():
    q, k, v = make(1, 2, 8, 8, 16)
    torch.testing.assert_close(FlashAttention(block_size=16)(q, k, v), attention_reference(q, k, v))
    with pytest.raises(ValueError, match="head dim 24"):
        flash_attention(*make(1, 1, 4, 4, 24))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        flash_attention(q, k, v, key_padding_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_layout must end in"):
        flash_attention(q, k, v, block_size=16, block_layout=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_size must be one of"):
        FlashAttention(block_size=48)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        attention(q, k, v, dropout_p=1.0, backend="triton")
    with pytest.raises(ValueError, match="dropout_p must be in"):
        flash_attention(q, k, v, dropout_p=-0.1)


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(("lq", "lk"), [(20, 36), (40, 145), (77, 64)])
def test_larger_shapes(d, lq, lk):
    b, h = 2, 3
    check(
        b,
        h,
        lq,
        lk,
        d,
        block_size=32,
        key_padding_mask=key_mask(b, lk),
        head_mask=torch.tensor([1, 0, 1], device=DEVICE),
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision runs on the GPU only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_gpu(dtype):
    check(4, 12, 40, 145, 64, block_size=64, dtype=dtype, key_padding_mask=key_mask(4, 145))


def test_auto_dispatch_falls_back_when_the_kernel_fails(monkeypatch, caplog):
    import vlcompress.kernels.dispatch as dispatch
    import vlcompress.kernels.flash_attention as fa

    q, k, v = make(1, 2, 8, 8, 16)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(dispatch, "_TRITON_FAILED", [])
    monkeypatch.setattr(dispatch, "_use_triton", lambda q: not dispatch._TRITON_FAILED)
    monkeypatch.setattr(fa, "flash_attention", broken)
    with caplog.at_level("WARNING"):
        out = attention(q, k, v)
    torch.testing.assert_close(out, attention_reference(q, k, v))
    assert calls == [1] and "using torch SDPA" in caplog.text
    attention(q, k, v)
    assert calls == [1]  # not tried again
    with pytest.raises(RuntimeError, match="no kernel"):
        attention(q, k, v, backend="triton")  # a forced backend reports the failure


# ---------------------------------------------------------------------- attention dropout
@pytest.mark.parametrize(
    ("shape", "features"),
    [
        ((2, 3, 20, 37, 16), {}),
        ((2, 2, 33, 17, 32), {"key_padding_mask": True, "head_mask": True}),
        ((1, 2, 40, 40, 16), {"block_layout": True}),
    ],
)
def test_dropout_matches_the_reference_with_the_kernels_mask(shape, features):
    """Forward and all three gradients equal a torch reference that applies the mask the
    kernel drew (regenerated by a separate kernel from the same seed): the backward's
    regenerated mask is the forward's."""
    b, h, lq, lk, d = shape
    masks = {}
    if features.get("key_padding_mask"):
        masks["key_padding_mask"] = key_mask(b, lk)
    if features.get("head_mask"):
        masks["head_mask"] = torch.tensor([1.0, 0.0], device=DEVICE)
    if features.get("block_layout"):
        masks["block_layout"] = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]], device=DEVICE)
    q, k, v = make(b, h, lq, lk, d)
    seed = torch.tensor([20261123], device=DEVICE)
    out = flash_attention(q, k, v, block_size=16, dropout_p=0.25, seed=seed, **masks)
    keep = dropout_keep_mask(seed, b, h, lq, lk, 0.25)
    ref = attention_reference(q, k, v, block_size=16, dropout_p=0.25, dropout_mask=keep, **masks)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, e in zip("qkv", got, want):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5, msg=f"d{name}")
    plain = attention_reference(q, k, v, block_size=16, **masks)
    assert not torch.allclose(out, plain, atol=1e-3)  # dropout did drop something


def test_dropout_mask_statistics_and_reproducibility():
    """Keep rate 1 - p, survivors scaled to an unbiased mean, masks independent across heads,
    calls and seeds; ``torch.manual_seed`` repeats a call exactly."""
    p = 0.1
    keep = dropout_keep_mask(torch.tensor([7], device=DEVICE), 4, 12, 40, 100, p).float()
    n = keep.numel()  # 192,000 draws: the keep rate is within 4 standard errors of 0.9
    assert abs(keep.mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    assert abs((keep / (1 - p)).mean().item() - 1.0) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    # consecutive seeds are not the same streams shifted by one (batch, head) pair
    assert not torch.equal(
        keep[0, 1], dropout_keep_mask(torch.tensor([8], device=DEVICE), 4, 12, 40, 100, p)[0, 0]
    )
    other = dropout_keep_mask(torch.tensor([8], device=DEVICE), 4, 12, 40, 100, p).float()
    agree = (keep == other).float().mean().item()  # independent masks agree on p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    q, k, v = make(2, 2, 9, 11, 16)
    torch.manual_seed(3)
    a = flash_attention(q, k, v, block_size=16, dropout_p=0.3)
    b = flash_attention(q, k, v, block_size=16, dropout_p=0.3)
    torch.manual_seed(3)
    again = flash_attention(q, k, v, block_size=16, dropout_p=0.3)
    assert torch.equal(a, again) and not torch.equal(a, b)
    # the expectation over many masks is the attention without dropout
    plain = attention_reference(q, k, v)
    mean = torch.stack([flash_attention(q, k, v, block_size=16, dropout_p=0.3)
                        for _ in range(200)]).mean(0)  # fmt: skip
    assert (mean - plain).abs().mean() < 0.05 * plain.abs().mean()


def test_dispatch_uses_the_kernel_with_dropout():
    q, k, v = make(2, 2, 9, 11, 16)
    torch.manual_seed(5)
    out = attention(q, k, v, dropout_p=0.2, backend="triton", block_size=16)
    torch.manual_seed(5)
    assert torch.equal(out, flash_attention(q, k, v, block_size=16, dropout_p=0.2))


# ---------------------------------------------------------------------- packed (varlen)
def pack(x, lengths):
    """(B, H, L, D) padded -> (total, H, D), sequences concatenated."""
    return torch.cat([x[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize(
    ("q_lengths", "k_lengths", "features"),
    [
        ([14, 9, 1, 20], None, {}),  # self-attention, ragged
        ([5, 17, 33], [36, 2, 40], {"head_mask": True}),  # cross-attention, dead heads
        ([7, 16, 3], [12, 0, 9], {"dropout": True}),  # a sequence without keys; dropout
    ],
)
def test_varlen_matches_the_padded_reference(q_lengths, k_lengths, features):
    """Packed sequences give the padded reference's outputs and gradients on every real row,
    and padded rows simply do not exist."""
    k_lengths = k_lengths or q_lengths
    b, h, d = len(q_lengths), 2, 16
    lq, lk = max(q_lengths), max(max(k_lengths), 1)
    q, k, v = make(b, h, lq, lk, d)
    kpm = (torch.arange(lk)[None, :] < torch.tensor(k_lengths)[:, None]).to(DEVICE)
    masks = {}
    if features.get("head_mask"):
        masks["head_mask"] = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], device=DEVICE)
    seed = torch.tensor([99], device=DEVICE)
    p = 0.2 if features.get("dropout") else 0.0
    pq, pk, pv = (pack(x.detach(), n).requires_grad_() for x, n in
                  ((q, q_lengths), (k, k_lengths), (v, k_lengths)))  # fmt: skip
    cu_q, cu_k = cumulative(q_lengths).to(DEVICE), cumulative(k_lengths).to(DEVICE)
    out = flash_attention_varlen(pq, pk, pv, cu_q, cu_k, block_size=16, dropout_p=p, seed=seed,
                                 **masks)  # fmt: skip
    keep = dropout_keep_mask(seed, b, h, lq, lk, p) if p else None
    ref = attention_reference(q, k, v, key_padding_mask=kpm, dropout_p=p, dropout_mask=keep,
                              **masks)  # fmt: skip
    assert out.shape == (sum(q_lengths), h, d)
    torch.testing.assert_close(out, pack(ref, q_lengths), rtol=2e-5, atol=2e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (pq, pk, pv), g)
    g_pad = torch.zeros_like(ref)
    for i, (start, n) in enumerate(zip(cu_q[:-1].tolist(), q_lengths)):
        g_pad[i, :, :n] = g[start : start + n].transpose(0, 1)
    want = torch.autograd.grad(ref, (q, k, v), g_pad)
    for name, a, e, n in zip("qkv", got, want, (q_lengths, k_lengths, k_lengths)):
        torch.testing.assert_close(a, pack(e, n), rtol=2e-5, atol=2e-5, msg=f"d{name}")


def test_varlen_bad_input_is_named():
    q = torch.randn(10, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match="end at the packed length 10"):
        flash_attention_varlen(q, q, q, torch.tensor([0, 4, 9]), torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="B \\+ 1 cumulative lengths"):
        flash_attention_varlen(q, q, q, torch.tensor([0.0, 10.0]), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="3 and 2 sequences"):
        flash_attention_varlen(q, q, q, torch.tensor([0, 4, 6, 10]), torch.tensor([0, 4, 10]))
    with pytest.raises(ValueError, match="packed q, k, v must be"):
        flash_attention_varlen(q[None], q, q, torch.tensor([0, 10]), torch.tensor([0, 10]))


def test_varlen_dispatch_agrees_on_both_backends_and_packing_round_trips():
    from vlcompress.kernels import attention_varlen, cu_seqlens, pack, unpack

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 12, 2, 16, generator=g).to(DEVICE)  # (B, L, H, D) as models hold it
    mask = (torch.arange(12)[None, :] < torch.tensor([12, 5, 1])[:, None]).to(DEVICE)
    packed, cu = pack(x, mask)
    assert cu.tolist() == [0, 12, 17, 18] and packed.shape == (18, 2, 16)
    assert torch.equal(unpack(packed, mask), x * mask[:, :, None, None])
    holes = torch.tensor([[True, False, True], [False, True, False]])
    assert cu_seqlens(holes).tolist() == [0, 2, 3]
    y = torch.arange(6.0).view(2, 3)
    assert torch.equal(unpack(pack(y, holes)[0], holes), y * holes)
    ref = attention_reference(*(x.transpose(1, 2) for _ in range(3)), key_padding_mask=mask)
    want = pack(ref.transpose(1, 2), mask)[0]
    for backend in ("sdpa", "triton"):
        got = attention_varlen(packed, packed, packed, cu.cpu(), cu.cpu(), backend=backend)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5, msg=backend)
    with pytest.raises(ValueError, match="shorter than the longest"):
        attention_varlen(packed, packed, packed, cu, cu, 5, 12, backend="triton")


def test_launch_configuration_is_measured_once_per_shape_and_used(monkeypatch):
    """The tuner (GPU only; forced here with a fake clock) times every candidate once per
    (Lq, Lk, D, dtype), keeps the fastest, and the call runs correctly with it."""
    import vlcompress.kernels.flash_attention as fa

    timed = []

    def fake_time(cfg, run):
        run(cfg)  # each candidate really launches (so a broken one would be skipped)
        timed.append(cfg)
        return 1.0 if cfg == fa.LaunchConfig(32, 4, 2) else 2.0

    monkeypatch.setattr(fa, "_TUNED", {})
    monkeypatch.setattr(fa, "_should_tune", lambda q: True)
    monkeypatch.setattr(fa, "_time_config", fake_time)
    q, k, v = make(2, 2, 40, 70, 16)
    kpm = key_mask(2, 70)
    out = flash_attention(q, k, v, kpm)
    assert timed == list(fa.CANDIDATES)
    assert list(fa._TUNED.values()) == [fa.LaunchConfig(32, 4, 2)]
    torch.testing.assert_close(out, attention_reference(q, k, v, kpm), rtol=2e-5, atol=2e-5)
    got = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    want = torch.autograd.grad(attention_reference(q, k, v, kpm), (q, k, v), torch.ones_like(out))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-5)
    flash_attention(q, k, v, kpm)
    assert len(timed) == len(fa.CANDIDATES)  # cached: not measured again
    flash_attention(q[:, :, :20], k, v, kpm)
    assert len(timed) == 2 * len(fa.CANDIDATES)  # a new shape is measured
