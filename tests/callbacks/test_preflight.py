"""``CompressionCallback.preflight``: the problems a callback would hit on a model, found on a
model built on the meta device, and raised by ``setup`` in the same words."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlcompress import registry
from vlcompress.callbacks import CompressionCallback

SOLO = type("Solo", (), {"world_size": 1, "global_rank": 0, "global_step": 0})()


@pytest.fixture(scope="module")
def mcan_meta() -> nn.Module:
    with torch.device("meta"):
        return registry.build("model", "mcan_small", {}, vocab_size=50, num_answers=10)


def test_base_preflight_is_clean_on_a_meta_model(mcan_meta):
    assert next(mcan_meta.parameters()).is_meta
    assert CompressionCallback().preflight(mcan_meta) == []


def test_base_preflight_reports_an_unrecognised_model_as_text():
    problems = CompressionCallback().preflight(nn.Sequential(nn.Linear(2, 2)))
    assert len(problems) == 1
    assert "cannot find the structure of Sequential" in problems[0]
    assert "AnatomyPatterns" in problems[0]


def test_no_anatomy_needed_means_no_anatomy_problem():
    class Counter(CompressionCallback):
        requires_anatomy = False

    assert Counter().preflight(nn.Linear(2, 2)) == []


def test_setup_raises_the_preflight_problems():
    class Picky(CompressionCallback):
        def preflight(self, model):
            return super().preflight(model) + ["option x: bad; set x=1", "option y: bad"]

    module = nn.Module()
    with torch.device("meta"):
        module.model = registry.build("model", "mcan_small", {}, vocab_size=50, num_answers=10)
    with pytest.raises(ValueError, match=r"Picky: option x: bad; set x=1; option y: bad$"):
        Picky(seed=0).setup(SOLO, module, "fit")
