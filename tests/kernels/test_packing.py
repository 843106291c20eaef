"""Packing ragged batches: :class:`Packing` (real positions found once) and the conversions
from cumulative lengths alone agree with boolean-mask packing, carry gradients, and read the
device only where they must."""

import pytest
import torch

from vlcompress.kernels import Packing, pack, packed_to_padded, padded_to_packed, unpack
from vlcompress.kernels.host_syncs import HostSyncCounter


def ragged(b=4, length=7, holes=False):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 0, 3, 5])[:b]
    mask = torch.arange(length) < lengths[:, None]
    if holes:
        mask[0, 2] = False  # a hole inside a row
    return torch.randn(b, length, 3, 2, generator=g), mask


@pytest.mark.parametrize("holes", [False, True])
def test_packing_packs_and_unpacks_like_boolean_masks(holes):
    x, mask = ragged(holes=holes)
    p = Packing.of(mask)
    want, cu = pack(x, mask)
    assert torch.equal(p.pack(x), want) and torch.equal(p.cu_seqlens, cu)
    assert p.total == int(mask.sum()) and p.max_seqlen == mask.shape[1]
    assert torch.equal(p.unpack(want), unpack(want, mask))


def test_packing_reads_the_device_once_and_carries_gradients():
    x, mask = ragged()
    x.requires_grad_(True)
    with HostSyncCounter() as count:
        p = Packing.of(mask)
    assert count.syncs == 1
    with HostSyncCounter() as count:
        y = p.unpack(p.pack(x) * 2.0)
        y.sum().backward()
    assert count.syncs == 0
    assert torch.equal(x.grad, 2.0 * mask[..., None, None].expand_as(x).float())


def test_a_full_packing_needs_no_device_read():
    with HostSyncCounter() as count:
        full = Packing.full(3, 4, "cpu")
    want = Packing.of(torch.ones(3, 4, dtype=torch.bool))
    assert count.syncs == 0 and full.total == 12
    for a, b in zip(
        (full.mask, full.index, full.cu_seqlens), (want.mask, want.index, want.cu_seqlens)
    ):
        assert torch.equal(a, b) and a.dtype == b.dtype


def test_packing_refuses_mismatched_tensors():
    x, mask = ragged()
    p = Packing.of(mask)
    with pytest.raises(ValueError, match="cannot pack"):
        p.pack(x[:, :5])
    with pytest.raises(ValueError, match="cannot unpack"):
        p.unpack(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        Packing.of(mask[0])


def test_conversions_from_cumulative_lengths_need_no_device_read():
    x, mask = ragged()
    packed, cu = pack(x, mask)
    packed.requires_grad_(True)
    with HostSyncCounter() as count:
        padded, pmask = packed_to_padded(packed, cu, 7)
        back = padded_to_packed(padded, cu, packed.shape[0])
        back.sum().backward()
    assert count.syncs == 0
    assert torch.equal(pmask, mask) and torch.equal(padded, unpack(packed, mask))
    assert torch.equal(back, packed) and torch.equal(packed.grad, torch.ones_like(packed))
    empty, emask = packed_to_padded(packed[:0], torch.zeros(3, dtype=torch.int32), 4)
    assert empty.shape == (2, 4, 3, 2) and not emask.any()
