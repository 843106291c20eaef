"""Counting what a piece of code costs the GPU's host side, on any device (the CPU included):
the torch operators it issues (each one a kernel launch on CUDA) and the ones that make the
host wait for the device (a read of a tensor's value, or an output whose size depends on the
data). A training step that reads the device once per layer cannot keep a GPU busy; this
makes that visible and testable without a GPU.

Example::

    with HostSyncCounter() as count:
        model(batch)
    assert count.syncs <= 2, count.sync_ops     # e.g. Counter({'nonzero': 2}), ops: count.ops
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter"]

_aten = torch.ops.aten
_ALWAYS_SYNC = {
    _aten._local_scalar_dense.default,  # .item(), int(t), bool(t), float(t)
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.unique_consecutive.default,
    _aten._unique2.default,
    _aten.is_nonzero.default,
    _aten.equal.default,
    _aten.bincount.default,
    _aten.histc.default,
    _aten.unique_dim.default,
}
_BOOL_INDEXING = {
    _aten.index.Tensor,
    _aten.index_put.default,
    _aten.index_put_.default,
    _aten._index_put_impl_.default,
}


def _on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "meta")


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _ALWAYS_SYNC:
        return True
    if func is _aten.repeat_interleave.Tensor:  # without output_size it reads the counts
        return kwargs.get("output_size") is None
    if func is _aten._to_copy.default:  # .cpu() / .tolist() of a device tensor, or .to(device)
        device = kwargs.get("device")
        if device is None or _on_device(args[0]) == (torch.device(device).type != "cpu"):
            return False
        return _on_device(args[0]) or not kwargs.get("non_blocking", False)
    if func is _aten.copy_.default:  # device -> host, or a blocking host -> device copy
        dst, src = args[0], args[1]
        if _on_device(dst) == _on_device(src):
            return False
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        return _on_device(src) or blocking
    if func in _BOOL_INDEXING and len(args) > 1:  # x[mask]: a nonzero inside
        return any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
            for i in args[1]
            if i is not None
        )
    return False


class HostSyncCounter(TorchDispatchMode):
    """A context manager counting torch operators (``ops``) and those among them that
    synchronise the host with a CUDA device (``syncs``; by name in ``sync_ops``): reads of a
    value, data-dependent output sizes, copies from the device to the host and blocking copies
    from the host to the device. On the CPU the
    same code counts the same, except reads of a CPU tensor's values that bypass torch's
    operators (``tolist``, ``numpy``), which are free there."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.syncs = 0
        self.sync_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        self.ops += 1
        if _is_sync(func, args, kwargs):
            self.syncs += 1
            self.sync_ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)
