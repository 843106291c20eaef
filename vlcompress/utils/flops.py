"""Parameters, multiply-accumulates (MACs), FLOPs and latency of a model on one input.

Conventions: one MAC is one multiply-add; FLOPs = 2 x MACs. Counted: matrix products (linear
layers, attention's two products), convolutions, LSTMs. Not counted: element-wise work (norms,
activations, softmax), as in the usual counters (fvcore, thop) and in the papers' tables. Papers
that say "FLOPs" usually report MACs: compare with :attr:`Compute.macs`.

``torch.utils.flop_counter`` misses two ops that our models run on the CPU: the CPU kernel of
``scaled_dot_product_attention`` (``aten._scaled_dot_product_flash_attention_for_cpu``) and the
fused ``nn.LSTM``. :func:`count_compute` counts both itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = [
    "Compute",
    "count_compute",
    "count_parameters",
    "flops_per_sample",
    "latency_samples",
    "measure_latency",
    "resize_batch",
]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


@dataclass(frozen=True)
class Compute:
    """What one forward pass costs.

    Attributes:
        macs: multiply-accumulates (what papers' "FLOPs" usually are).
        flops: floating-point operations, ``2 * macs``.
        attention_macs: the part of ``macs`` in attention's two products.
    """

    macs: int
    flops: int
    attention_macs: int


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (same as the GPU kernels)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _lstm_macs(m: nn.LSTM, batch: int, steps: int) -> int:
    dirs = 2 if m.bidirectional else 1
    total = 0
    for layer in range(m.num_layers):
        inp = m.input_size if layer == 0 else m.hidden_size * dirs
        total += dirs * batch * steps * 4 * m.hidden_size * (inp + m.hidden_size)
    return total


@torch.no_grad()
def count_compute(model: nn.Module, *args: Any, **kwargs: Any) -> Compute:
    """MACs and FLOPs of ``model(*args, **kwargs)``, counted on the real call (eval mode).

    Attention on padded keys counts as computed (the dense convention); LSTMs count every
    time step of their input.

    Returns:
        A :class:`Compute`.
    """
    sdpa_ops = {}
    cpu_op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_op is not None:
        sdpa_ops[cpu_op] = _cpu_sdpa_flops
    lstm = 0

    def on_lstm(m: nn.LSTM, inputs: tuple, _out: Any) -> None:
        nonlocal lstm
        x = inputs[0]
        if isinstance(x, torch.Tensor):
            steps, batch = (x.shape[1], x.shape[0]) if m.batch_first else (x.shape[0], x.shape[1])
            lstm += _lstm_macs(m, batch if x.dim() == 3 else 1, steps)

    hooks = [m.register_forward_hook(on_lstm) for m in model.modules() if isinstance(m, nn.LSTM)]
    was = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False, custom_mapping=sdpa_ops)
        with counter:
            model(*args, **kwargs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts().get("Global", {})
    attention = sum(v for op, v in counts.items() if "scaled_dot_product" in str(op))
    flops = int(counter.get_total_flops()) + 2 * lstm
    return Compute(macs=flops // 2, flops=flops, attention_macs=int(attention) // 2)


def resize_batch(batch: Any, size: int) -> Any:
    """A dataclass batch (a :class:`~vlcompress.data.VLBatch`) of ``size`` examples, its rows
    repeated cyclically; tensors and lists are resized, other fields kept."""
    if not is_dataclass(batch):
        raise TypeError(f"resize_batch needs a dataclass batch, got {type(batch).__name__}")
    n = len(batch)
    index = torch.arange(size) % n
    out = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n:
            out[f.name] = v[index.to(v.device)]
        elif isinstance(v, list) and len(v) == n:
            out[f.name] = [v[i] for i in index.tolist()]
    return replace(batch, **out)


def flops_per_sample(model: nn.Module, batch: Any) -> int:
    """Forward FLOPs for the first example of ``batch`` (a :class:`VLBatch`), model in eval
    mode (see :func:`count_compute`)."""
    return count_compute(model, resize_batch(batch, 1)).flops


@torch.inference_mode()
def latency_samples(
    fn: Callable[[], Any],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` in seconds, after ``warmup`` untimed ones
    (CUDA synchronised around each call when ``device`` is a GPU).

    Args:
        fn: the call to time (e.g. ``lambda: model(batch)``).
        repeats: timed calls.
        warmup: untimed calls first.
        device: the device the work runs on (``None``: CPU).
    """
    cuda = device is not None and torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def interleaved_latency(
    fns: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 2
) -> dict[str, list[float]]:
    """Wall times (seconds) of several calls timed in turn, ``repeats`` rounds of one call each
    after ``warmup`` untimed rounds, so that a noisy machine slows them all alike (compare
    medians of one such run, never numbers of separate runs). Grad mode is the caller's: wrap
    the call in ``torch.inference_mode()`` to time inference."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return times


def measure_latency(
    fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, device: torch.device | None = None
) -> float:
    """Median wall time of ``fn()`` in seconds (see :func:`latency_samples`)."""
    return statistics.median(latency_samples(fn, repeats, warmup, device))
