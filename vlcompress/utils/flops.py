"""FLOPs and parameter counts of a model on one example."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts."""
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def _lstm_flops(model: nn.Module, seq_len: int) -> int:
    """Multiply-adds x 2 of every ``nn.LSTM`` for one sequence of ``seq_len`` steps (torch's
    counter does not see the fused LSTM op)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.LSTM):
            dirs = 2 if m.bidirectional else 1
            for layer in range(m.num_layers):
                inp = m.input_size if layer == 0 else m.hidden_size * dirs
                total += dirs * seq_len * 2 * 4 * m.hidden_size * (inp + m.hidden_size)
    return total


@torch.no_grad()
def flops_per_sample(model: nn.Module, batch) -> int:
    """Forward FLOPs for the first example of ``batch`` (a :class:`VLBatch`), model in eval mode."""
    from dataclasses import fields, replace

    one = replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[:1]
            for f in fields(batch)
            if getattr(batch, f.name) is not None
        },
    )
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(one)
        total = counter.get_total_flops()
    finally:
        model.train(was_training)
    return int(total + _lstm_flops(model, int(one.text_ids.shape[1])))
