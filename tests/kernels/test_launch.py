"""The attention launchers' host-side cost, on the CPU with the Triton kernels stubbed out (so
only the launcher's own torch operators run): no host-device synchronisation, a bounded number
of operators per call, cumulative lengths checked without reading them on a GPU, and the
cache of shape-only constants bounded and never aliased into outputs."""

import os

import pytest
import torch

pytest.importorskip("triton")

import vlcompress.kernels.flash_attention as fa  # noqa: E402
from vlcompress.kernels.host_syncs import HostSyncCounter  # noqa: E402

B, H, LQ, LK, D = 4, 2, 20, 30, 16
KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")


class Stub:
    """A Triton kernel that launches nothing and remembers the arguments of each launch."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, args))


@pytest.fixture
def launches(monkeypatch):
    """The kernels stubbed; the list of (kernel name, arguments) launched."""
    calls = []
    for name in KERNELS:
        monkeypatch.setattr(fa, name, Stub(name, calls))
    return calls


@pytest.fixture
def on_device(monkeypatch):
    """CPU cumulative lengths handled as GPU ones: checked on the device (torch._assert_async),
    read only where a max_seqlen is None."""
    monkeypatch.setattr(fa, "_validate_on_host", lambda cu: False)


def padded():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, n, D, generator=g).requires_grad_() for n in (LQ, LK, LK)]


def key_mask():
    return torch.arange(LK)[None, :] < torch.tensor([30, 20, 10, 25])[:, None]


def packed(total):
    return torch.randn(total, H, D).requires_grad_()


CU = torch.tensor([0, 30, 50, 51, 80], dtype=torch.int32)  # total 80, longest 30
CU_K = torch.tensor([0, 3, 40, 41, 44], dtype=torch.int32)  # total 44, longest 37


def counted(fn, inputs):
    """Warm (caches filled), then the counts of the forward and of the backward to
    ``inputs`` (without accumulating into ``.grad``)."""
    fn()
    with HostSyncCounter() as fwd:
        out = fn()
    g = torch.ones_like(out)
    with HostSyncCounter() as bwd:
        torch.autograd.grad(out, inputs, g, allow_unused=True)
    return fwd, bwd


# ---------------------------------------------------------------------- host syncs
def test_varlen_with_max_seqlen_on_the_device_reads_nothing(launches, on_device, monkeypatch):
    def no_read(self, *args, **kwargs):
        raise AssertionError("a value of a device tensor was read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_read)
    monkeypatch.setattr(torch.Tensor, "item", no_read)
    q, k = packed(80), packed(44)
    for call in (
        lambda: fa.flash_attention_varlen(q, q, q, CU, CU, 30, 30),  # self-attention
        lambda: fa.flash_attention_varlen(q, k, k, CU, CU_K, 30, 37, dropout_p=0.1),
        lambda: fa.flash_attention_varlen(
            q, q, q, CU.long(), CU.long(), 32, 32, head_mask=torch.tensor([1, 0])
        ),
    ):
        fwd, bwd = counted(call, (q, k))
        assert fwd.syncs == 0 and bwd.syncs == 0, (fwd.sync_ops, bwd.sync_ops)


def test_varlen_without_max_seqlen_reads_once(launches, on_device, monkeypatch):
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or tolist(t))
    q, k = packed(80), packed(44)
    fa.flash_attention_varlen(q, q, q, CU, CU)
    assert len(reads) == 1
    fa.flash_attention_varlen(q, k, k, CU, CU_K)  # both sides in one read
    assert len(reads) == 2


def test_both_checks_launch_the_same_plan(launches, monkeypatch):
    """max_seqlen longer than the longest sequence is kept (the grid and the dropout's
    counter use it), whether the lengths were read on the host or not."""
    q, k = packed(80), packed(44)
    fa.flash_attention_varlen(q, k, k, CU, CU_K, 33, 40, dropout_p=0.1, seed=torch.tensor([1]))
    monkeypatch.setattr(fa, "_validate_on_host", lambda cu: False)
    fa.flash_attention_varlen(q, k, k, CU, CU_K, 33, 40, dropout_p=0.1, seed=torch.tensor([1]))
    host, device = (args for _, args in launches)
    assert len(host) == len(device)
    for a, b in zip(host[5:], device[5:]):  # the plan, strides, scale, H, max_seqlen_k, p
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b
    assert 40 in host[-4:]


def test_padded_forward_and_backward_do_not_sync(launches):
    q, k, v = padded()
    layout = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    for kwargs in (
        {},
        {"key_padding_mask": key_mask(), "dropout_p": 0.1},
        {"key_padding_mask": key_mask().float(), "head_mask": torch.tensor([1.0, 0.0])},
        {"head_mask": torch.ones(B, H, dtype=torch.bool), "block_layout": layout,
         "block_size": 16},
    ):  # fmt: skip
        fwd, bwd = counted(lambda: fa.flash_attention(q, k, v, **kwargs), (q, k, v))  # noqa: B023
        assert fwd.syncs == 0 and bwd.syncs == 0, (kwargs, fwd.sync_ops, bwd.sync_ops)


# ---------------------------------------------------------------------- operators per call
# Measured with torch 2.14 (the launcher alone; before the constant cache: 16 / 13 / 37).
# Forward: o and lse (+ autograd's detach), plus the masks' and lengths' own; backward: delta
# (2), dq, dk, dv (+ autograd's detach).
BOUNDS = {
    "padded": (3, 6),
    "padded, key padding, dropout": (8, 6),
    "varlen, host check": (9, 6),
    "varlen, device check": (18, 6),
}


def test_operators_per_call_stay_few(launches, monkeypatch):
    q, k, v = padded()
    (pq, pk, pv), kpm = (packed(80) for _ in "qkv"), key_mask()
    calls = {
        "padded": (lambda: fa.flash_attention(q, k, v), (q, k, v)),
        "padded, key padding, dropout": (
            lambda: fa.flash_attention(q, k, v, kpm, dropout_p=0.1),
            (q, k, v),
        ),
        "varlen, host check": (
            lambda: fa.flash_attention_varlen(pq, pk, pv, CU, CU, 30, 30),
            (pq, pk, pv),
        ),
    }
    got = {name: counted(*call) for name, call in calls.items()}
    monkeypatch.setattr(fa, "_validate_on_host", lambda cu: False)
    got["varlen, device check"] = counted(*calls["varlen, host check"])
    for name, (fwd, bwd) in got.items():
        assert fwd.ops <= BOUNDS[name][0] and bwd.ops <= BOUNDS[name][1], (
            f"{name}: {fwd.ops} forward / {bwd.ops} backward operators, bound {BOUNDS[name]}"
        )


def test_no_gradient_wanted_means_no_graph_node(launches):
    q, k, v = padded()
    assert fa.flash_attention(q, k, v).grad_fn is not None
    with torch.no_grad():
        with HostSyncCounter() as count:
            out = fa.flash_attention(q, k, v)
    assert out.grad_fn is None and count.ops == 2  # o and lse only
    assert fa.flash_attention(q.detach(), k.detach(), v.detach()).grad_fn is None


# ---------------------------------------------------------------------- bad cumulative lengths
BAD = [
    (torch.tensor([0, 4, 9]), "end at the packed length 10"),
    (torch.tensor([1, 4, 10]), "start at 0"),
    (torch.tensor([0, 6, 4, 10]), "never decrease"),
]


@pytest.mark.parametrize(("cu", "message"), BAD)
def test_bad_cumulative_lengths_are_refused_on_the_host(launches, cu, message):
    q = packed(10)
    with pytest.raises(ValueError, match=message):
        fa.flash_attention_varlen(q, q, q, cu, cu, 10, 10)
    with pytest.raises(ValueError, match=message):
        fa.flash_attention_varlen(q, q, q, cu, cu)


@pytest.mark.parametrize(("cu", "message"), BAD)
def test_bad_cumulative_lengths_fail_on_the_device_without_a_read(launches, on_device, cu,
                                                                  message):  # fmt: skip
    q = packed(10)
    with HostSyncCounter() as count, pytest.raises(RuntimeError, match=message):
        fa.flash_attention_varlen(q, q, q, cu, cu, 10, 10)
    assert count.syncs == 0
    with pytest.raises(ValueError, match=message):  # read anyway when max_seqlen is None
        fa.flash_attention_varlen(q, q, q, cu, cu)


@pytest.mark.parametrize("device_check", [False, True])
def test_max_seqlen_shorter_than_a_sequence_and_bad_layouts(launches, monkeypatch,
                                                            device_check):  # fmt: skip
    monkeypatch.setattr(fa, "_validate_on_host", lambda cu: not device_check)
    q, k = packed(80), packed(44)
    error = RuntimeError if device_check else ValueError
    with pytest.raises(error, match="longer than 29" if device_check else "shorter than"):
        fa.flash_attention_varlen(q, q, q, CU, CU, 29, 29)
    with pytest.raises(error, match="longer than 36" if device_check else "max_seqlen_k 36"):
        fa.flash_attention_varlen(q, k, k, CU, CU_K, 30, 36)
    with pytest.raises(ValueError, match="B \\+ 1 cumulative lengths"):
        fa.flash_attention_varlen(q, q, q, CU.float(), CU, 30, 30)
    with pytest.raises(ValueError, match="B \\+ 1 cumulative lengths"):
        fa.flash_attention_varlen(q, q, q, CU[None], CU, 30, 30)
    with pytest.raises(ValueError, match="4 and 3 sequences"):
        fa.flash_attention_varlen(q, k, k, CU, CU_K[:-1], 30, 37)
    assert not launches


# ---------------------------------------------------------------------- constant cache
def test_constant_cache_is_bounded_reused_and_never_written_or_aliased(launches):
    fa._cached_constants.cache_clear()
    q, k, v = padded()
    out = fa.flash_attention(q, k, v, dropout_p=0.0)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    fwd_args = launches[0][1]
    assert launches[0][0] == "_fwd_kernel"
    plan_tensors = fwd_args[5:13]  # qoff, koff, qlen, kvlen, kmask, hmask, layout, seed
    # a second call of the shape launches with the very same constant tensors
    fa.flash_attention(q, k, v)
    again = [a for name, a in launches if name == "_fwd_kernel"][-1][5:13]
    assert all(a is b for a, b in zip(plan_tensors, again))
    # no output or gradient shares memory with a cached tensor, and none was written
    cached = {t.untyped_storage().data_ptr() for t in plan_tensors}
    for t in (out, *grads):
        assert t.untyped_storage().data_ptr() not in cached
    assert all(t._version == 0 for t in plan_tensors)
    # bounded: many shapes keep at most _CACHE_SIZE entries
    for lq in range(1, 2 * fa._CACHE_SIZE):
        x = torch.randn(1, 1, lq, D)
        fa.flash_attention(x, x, x)
    info = fa._cached_constants.cache_info()
    assert info.maxsize == fa._CACHE_SIZE and info.currsize <= fa._CACHE_SIZE


def test_constants_are_not_cached_during_graph_capture(monkeypatch):
    fa._cached_constants.cache_clear()
    monkeypatch.setattr(fa, "_capturing", lambda dev: True)
    a = fa._constants("padded", 2, 1, 3, 4, D, torch.device("cpu"))
    b = fa._constants("padded", 2, 1, 3, 4, D, torch.device("cpu"))
    assert a[0] is not b[0] and fa._cached_constants.cache_info().currsize == 0
    assert a[0].tolist() == [0, 3 * D] and a[4].tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------- real kernels (small)
@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no GPU and TRITON_INTERPRET is not 1",
)
def test_no_grad_path_equals_the_autograd_path():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).to(device) for n in (5, 7, 7))
    kpm = (torch.arange(7)[None, :] < torch.tensor([7, 3])[:, None]).to(device)
    seed = torch.tensor([11], device=device)
    with torch.no_grad():
        plain = fa.flash_attention(q, k, v, kpm, dropout_p=0.2, seed=seed, block_size=16)
    with_graph = fa.flash_attention(q.requires_grad_(), k, v, kpm, dropout_p=0.2, seed=seed,
                                    block_size=16)  # fmt: skip
    assert with_graph.grad_fn is not None
    torch.testing.assert_close(plain, with_graph.detach(), rtol=0, atol=0)


def test_constants_first_made_under_inference_mode_serve_a_training_call(launches):
    """Lightning validates under ``torch.inference_mode`` before training: the cached
    constants it makes there must be savable for a later call's backward."""
    fa._cached_constants.cache_clear()
    q, k, v = padded()
    with torch.inference_mode():
        fa.flash_attention(q.detach(), k.detach(), v.detach(), key_mask(), dropout_p=0.0)
    out = fa.flash_attention(q, k, v, key_mask(), dropout_p=0.0)  # saves the cached seed
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def test_a_transposed_head_mask_reaches_the_kernel_row_major(launches):
    hm = torch.ones(H, B)
    hm[1, 2] = hm[0, 3] = 0.0  # dead: batch 2 head 1, batch 3 head 0
    q, k, v = padded()
    for mask in (hm.t(), hm.t().bool()):  # (B, H) views with strides (1, B)
        fa.flash_attention(q, k, v, head_mask=mask)
        live = launches[-1][1][10]  # the (batch, head) liveness the kernel reads
        assert live.is_contiguous()  # the kernel reads its memory flat, row-major
        assert live.reshape(-1).tolist() == (hm.t().reshape(-1) != 0).to(torch.int8).tolist()
