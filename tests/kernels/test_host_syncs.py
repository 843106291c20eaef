"""HostSyncCounter counts the operators that make a GPU's host wait, and only those."""

import torch

from vlcompress.kernels.host_syncs import HostSyncCounter


def test_reads_and_data_dependent_sizes_are_syncs_arithmetic_is_not():
    x = torch.randn(4, 3)
    with HostSyncCounter() as count:
        y = (x * 2 + 1).softmax(-1).sum(0)
        idx = torch.tensor([0, 2])
        x.index_select(0, idx)
        x[idx]  # integer indexing: sizes known
    assert count.syncs == 0 and count.ops >= 6
    with HostSyncCounter() as count:
        float(y[0])  # a read
        bool((x > 0).any())  # a read
        x[x > 0]  # boolean indexing: a nonzero inside
        x.nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))  # output size read from the counts
    assert count.syncs == 5
    assert count.sync_ops == {"_local_scalar_dense": 2, "index": 1, "nonzero": 1,
                              "repeat_interleave": 1}  # fmt: skip
