"""The skipping bandit (seed 002): draws, probes, the seed's gate update, ranking and state."""

import math

import pytest
import torch

from vlcompress.compress.skipping import SkipGates

ARMS = [f"layer.{i}" for i in range(6)]


def test_draws_are_distinct_sorted_and_follow_the_gates():
    gates = SkipGates(ARMS, skip=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        s = gates.draw(g)
        assert len(set(s)) == 2 and list(s) == sorted(s)
    gates.gates[:] = torch.tensor([8.0, 8.0, -8.0, -8.0, -8.0, -8.0])
    counts = torch.zeros(6)
    for _ in range(200):
        for i in gates.draw(g):
            counts[i] += 1
    assert counts[:2].sum() > 0.9 * counts.sum()  # high gates are skipped far more often
    # the same generator seed draws the same sets (every DDP rank alike)
    a = SkipGates(ARMS, 2).probe_sets(3, torch.Generator().manual_seed(5))
    b = SkipGates(ARMS, 2).probe_sets(3, torch.Generator().manual_seed(5))
    assert a == b and len(set(a)) == 3


def test_probe_sets_cap_at_the_number_of_possible_sets():
    gates = SkipGates(ARMS[:3], skip=2)  # only 3 possible sets
    sets = gates.probe_sets(5, torch.Generator().manual_seed(0))
    assert sorted(sets) == [(0, 1), (0, 2), (1, 2)]
    with pytest.raises(ValueError, match="at least 2"):
        gates.probe_sets(1, torch.Generator())


def test_update_is_the_seeds_rule():
    gates = SkipGates(ARMS, skip=2, lr=1.0)
    gates.gates[:] = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.0, 0.0])
    p = torch.sigmoid(gates.gates.clone())
    sets, losses = [(0, 1), (1, 2), (3, 4)], [0.2, 1.0, 2.0]
    want = gates.gates.clone()
    r = [math.exp(-x) for x in losses]
    mean = sum(r) / 3
    for s, rk in zip(sets, r):
        for i in s:
            want[i] += (rk - mean) * p[i] * (1 - p[i])
    rewards = gates.update(sets, losses)
    assert rewards == pytest.approx(r)
    torch.testing.assert_close(gates.gates, want)
    assert gates.gates[0] > 0 and gates.gates[4] < 0  # low loss up, high loss down
    assert gates.gates[5] == 0  # not probed: unchanged
    assert gates.updates == 1 and len(gates.history) == 2
    with pytest.raises(ValueError, match="finite"):
        gates.update(sets, [0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="losses"):
        gates.update(sets, [0.1])


def test_search_finds_the_arms_that_cost_least():
    # a layer's "cost" when skipped: arms 4 and 5 are harmless, the rest hurt
    cost = torch.tensor([1.0, 0.8, 0.9, 0.7, 0.0, 0.05])
    gates = SkipGates(ARMS, skip=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        sets = gates.probe_sets(3, g)
        gates.update(sets, [cost[list(s)].sum().item() for s in sets])
    assert gates.top() == ["layer.4", "layer.5"]
    assert "layer.4" not in gates.bottom() and len(gates.bottom(3)) == 3


def test_state_round_trip_and_mismatch():
    gates = SkipGates(ARMS, skip=2)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        sets = gates.probe_sets(3, g)
        gates.update(sets, [0.1 * len(s) + s[0] for s in sets])
    other = SkipGates(ARMS, skip=2)
    other.load_state_dict(gates.state_dict())
    assert torch.equal(other.gates, gates.gates) and other.history == gates.history
    assert other.updates == 3
    with pytest.raises(ValueError, match="resume with the same"):
        SkipGates(ARMS, skip=1).load_state_dict(gates.state_dict())


@pytest.mark.parametrize("kw", [{"skip": 0}, {"skip": 6}, {"lr": 0.0}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        SkipGates(ARMS, **{"skip": 1, **kw})
