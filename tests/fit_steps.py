"""A few optimiser steps on one batch: whether a model can fit (``tests/`` is on ``sys.path``
through its conftest)."""

import torch
import torch.nn.functional as F


def bce_losses(model, batch, steps=12, lr=5e-3):
    """The BCE losses of ``steps`` AdamW steps of ``model`` on ``batch`` (soft-score targets)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(batch), batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
