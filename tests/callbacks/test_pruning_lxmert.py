"""The pruning callbacks on LXMERT (tiny variant): the seed's prunable weights per modality,
the pooler at the overall rate, and a masked forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlcompress import registry
from vlcompress.callbacks import MagnitudePruning, MaskTraining
from vlcompress.data.batch import VLBatch

SPLIT = {"language": 0.6, "vision": 0.04, "cross": 0.6}


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = registry.build(
            "model", "lxmert_tiny", {"visual_input": "pixels"}, vocab_size=60, num_answers=7
        )


def test_prunable_weights_follow_the_seed_and_the_pooler_takes_the_overall_rate():
    holder = Holder()
    cb = MagnitudePruning(SPLIT, seed=0)
    cb.setup(None, holder, "fit")
    names = {t.name: t for t in cb.targets}
    assert "lxmert.embeddings.word_embeddings.weight" in names
    assert names["lxmert.embeddings.word_embeddings.weight"].modality == "language"
    assert not any(
        "bias" in n or "LayerNorm" in n or "position" in n or "token_type" in n or "task_head" in n
        for n in names
    )
    assert names["lxmert.encoder.visn_fc.visn_fc.weight"].modality == "vision"
    assert names["lxmert.encoder.visn_fc.box_fc.weight"].modality == "vision"
    assert any(n.startswith("lxmert.encoder.x_layers.") for n in names)
    pooler = names["lxmert.pooler.dense.weight"]
    rest = [t for t in cb.targets if t is not pooler]
    overall = sum(t.numel * t.sparsity for t in rest) / sum(t.numel for t in rest)
    assert pooler.sparsity == pytest.approx(overall)
    assert 0.04 < pooler.sparsity < 0.6


def test_mask_training_runs_through_lxmert():
    holder = Holder()
    cb = MaskTraining(SPLIT, seed=0, score_lr=0.1, freeze="none")
    cb.setup(None, holder, "fit")
    cb.on_fit_start(None, holder)
    b = 3
    batch = VLBatch(
        text_ids=torch.randint(1, 60, (b, 6)),
        text_mask=torch.ones(b, 6, dtype=torch.bool),
        visual=torch.rand(b, 3, 64, 64),
    )
    logits = holder.model(batch)
    logits.sum().backward()
    # the last cross layer's vision branch does not reach the pooled [CLS]: no gradient there
    unused = {n for n, s in cb.scores.items() if s.grad is None}
    last = max(int(n.split(".")[3]) for n in cb.scores if ".x_layers." in n)
    assert unused and all(f"x_layers.{last}.visn" in n for n in unused)
    assert all(float(s.grad.abs().sum()) > 0 for n, s in cb.scores.items() if n not in unused)
    rep = cb.report()["sparsity"]["modalities"]
    assert rep["vision"]["actual"] == pytest.approx(0.04, abs=0.01)
    assert rep["language"]["actual"] == pytest.approx(0.6, abs=0.01)
