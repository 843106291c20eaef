"""Optimiser parameter groups from ``optim.lr_scale`` (regex -> learning-rate multiplier)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlcompress.tasks.vqa import param_groups


def _toy() -> nn.Module:
    m = nn.Module()
    m.encoder = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m.head = nn.Linear(4, 2)
    m.frozen = nn.Linear(4, 4)
    m.frozen.requires_grad_(False)
    return m


def test_first_matching_pattern_wins_and_the_rest_keep_the_base_rate():
    m = _toy()
    groups = param_groups(m, 1e-3, {r"encoder\.0\.": 0.1, r"encoder\.": 0.5})
    by_name = {g["name"]: g for g in groups}
    assert by_name[r"encoder\.0\."]["lr"] == pytest.approx(1e-4)
    assert by_name[r"encoder\."]["lr"] == pytest.approx(5e-4)
    assert by_name["default"]["lr"] == pytest.approx(1e-3)
    ids = {name: {id(p) for p in g["params"]} for name, g in by_name.items()}
    assert ids[r"encoder\.0\."] == {id(p) for p in m.encoder[0].parameters()}
    assert ids[r"encoder\."] == {id(p) for p in m.encoder[1].parameters()}
    assert ids["default"] == {id(p) for p in m.head.parameters()}  # frozen ones left out
    # the groups drive a real optimiser and a schedule scales them all alike
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-5, 2.5e-4, 5e-4])
    del sched
    assert len(param_groups(m, 1e-3, {})) == 1


@pytest.mark.parametrize(
    "scale, needle",
    [
        ({r"decoder\.": 0.1}, "match no parameter"),
        ({r"encoder": 0.1, r"encoder\.0": 0.5}, "an earlier pattern already took"),
        ({"encoder(": 0.1}, "not a regular expression"),
        ({"encoder": 0.0}, "positive number"),
        ({"encoder": None}, "positive number"),
    ],
)
def test_bad_patterns_are_named(scale, needle):
    with pytest.raises(ValueError, match=needle):
        param_groups(_toy(), 1e-3, scale)


def test_a_pattern_over_frozen_parameters_only_gets_no_group(caplog):
    """Mask training freezes the weights a recipe's lr_scale names: that is not a typo."""
    m = _toy()
    with caplog.at_level("INFO", logger="vlcompress.tasks.vqa"):
        groups = param_groups(m, 1e-3, {r"frozen\.": 0.1, r"encoder\.": 0.5})
    assert [g["name"] for g in groups] == [r"encoder\.", "default"]
    assert "match only frozen parameters" in caplog.text
