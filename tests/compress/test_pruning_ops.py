"""The pure-torch pruning pieces: exact masks, N:M, schedules, sparsity targets, appliers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlcompress.callbacks.pruning_base import masks_digest, pack_mask, unpack_mask
from vlcompress.compress.pruning import (
    ForwardMasks,
    PruningSchedule,
    exact_keep_mask,
    group_masks,
    keep_count,
    masked_weight,
    nm_mask,
    parse_sparsity,
    threshold_mask,
    zero_masked,
)


def test_exact_keep_mask_keeps_exactly_k_largest_even_with_ties():
    scores = torch.tensor([[0.5, 0.1, 0.5, 0.5], [0.9, 0.1, 0.5, 0.0]])
    mask = exact_keep_mask(scores, 4)
    assert int(mask.sum()) == 4
    assert mask[1, 0]  # the largest survives
    assert not mask[1, 3] and not mask[0, 1]  # the smallest do not
    # ties at the threshold: the first positions win
    assert mask.reshape(-1).tolist() == [True, False, True, True, True, False, False, False]
    assert int(exact_keep_mask(scores, 0).sum()) == 0
    assert bool(exact_keep_mask(scores, 8).all())
    with pytest.raises(ValueError, match="keep must be in"):
        exact_keep_mask(scores, 9)


def test_group_masks_per_matrix_and_global():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(10, 10, generator=g) * 0.01
    large = torch.rand(10, 10, generator=g)
    scores = {"a": small, "b": large}
    per = group_masks(scores, {"a": 0.5, "b": 0.5})
    assert int(per["a"].sum()) == int(per["b"].sum()) == 50
    glob = group_masks(scores, {"a": 0.5, "b": 0.5}, groups={"a": "x", "b": "x"})
    assert int(glob["a"].sum()) == 0 and int(glob["b"].sum()) == 100  # all small ones go
    with pytest.raises(ValueError, match="one sparsity"):
        group_masks(scores, {"a": 0.5, "b": 0.4}, groups={"a": "x", "b": "x"})


def test_nm_mask_keeps_n_of_every_m():
    w = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    mask = nm_mask(w, 2, 4)
    blocks = mask.reshape(6, 4, 4)
    assert (blocks.sum(-1) == 2).all()
    kept_min = (w.abs() * mask).reshape(6, 4, 4).masked_fill(~blocks, float("inf")).amin(-1)
    dropped_max = (w.abs() * ~mask).reshape(6, 4, 4).amax(-1)
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError, match="divisible by m=4"):
        nm_mask(torch.randn(3, 6))


@pytest.mark.parametrize("kind", ["linear", "cubic", "constant"])
def test_schedules_reach_the_target_at_the_last_event_and_grow(kind):
    plan = PruningSchedule(kind, start_step=10, end_step=50, every=15)
    assert plan.events() == [10, 25, 40, 50]
    values = [plan.sparsity_at(s, 0.9) for s in plan.events()]
    assert values[0] == pytest.approx(0.0) and values[-1] == pytest.approx(0.9)
    assert values == sorted(values)


def test_schedule_shapes():
    cubic = PruningSchedule("cubic", 0, 100, 10)
    linear = PruningSchedule("linear", 0, 100, 10)
    constant = PruningSchedule("constant", 0, 100, 25)
    assert cubic.sparsity_at(50, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))  # Zhu & Gupta
    assert linear.sparsity_at(50, 0.8) == pytest.approx(0.4)
    # constant: the same share of the remaining weights at every event (0.5 per event here)
    kept = [1 - constant.sparsity_at(s, 0.9375) for s in constant.events()]
    assert [b / a for a, b in zip(kept, kept[1:])] == pytest.approx([0.5] * 4)
    assert PruningSchedule("one_shot", 7).events() == [7]
    with pytest.raises(ValueError, match="schedule must be one of"):
        PruningSchedule("exponential")
    with pytest.raises(ValueError, match="end_step"):
        PruningSchedule("linear", 10, 5)


def test_parse_sparsity():
    assert parse_sparsity(0.5) == {"default": 0.5}
    assert parse_sparsity({"language": 0.6, "vision": 0.04}) == {"language": 0.6, "vision": 0.04}
    with pytest.raises(ValueError, match="fraction of weights zeroed"):
        parse_sparsity(1.0)
    with pytest.raises(ValueError, match="unknown modality 'text'"):
        parse_sparsity({"text": 0.5})
    with pytest.raises(TypeError):
        parse_sparsity("half")
    assert keep_count(10, 0.25) == 8  # round(2.5) = 2 zeroed


def test_pack_roundtrip_and_digest():
    mask = torch.rand(7, 13, generator=torch.Generator().manual_seed(2)) > 0.3
    back = unpack_mask(pack_mask(mask))
    assert torch.equal(back, mask)
    assert pack_mask(mask)["bits"].numel() == (7 * 13 + 7) // 8
    other = mask.clone()
    other[0, 0] = ~other[0, 0]
    assert masks_digest({"a": mask}) != masks_digest({"a": other})


def test_forward_masks_use_masked_weights_and_pass_gradients_to_scores():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 3, batch_first=True))
    scores = {
        "0.weight": torch.rand(4, 4, requires_grad=True),
        "1.weight_ih_l0": torch.rand(12, 4, requires_grad=True),
    }
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fm = ForwardMasks(model, list(scores), lambda n: threshold_mask(scores[n], 0.5))
    x = torch.randn(2, 5, 4)
    out, _ = model(x)
    out.sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores.values())
    # the parameters themselves are untouched, and names do not change
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # same output as a model whose weights are multiplied by the masks
    ref = nn.Sequential(nn.Linear(4, 4), nn.LSTM(4, 3, batch_first=True))
    ref.load_state_dict(before)
    zero_masked(dict(ref.named_parameters()), {n: (s > 0.5) for n, s in scores.items()})
    assert torch.allclose(ref(x)[0], out)
    fm.bake()
    fm.remove()
    assert torch.allclose(model(x)[0], out)
    assert torch.equal(
        model[0].weight == 0, (scores["0.weight"] <= 0.5) | (before["0.weight"] == 0)
    )


def test_masked_weight_matches_mask_times_weight_with_straight_through_gradients():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, generator=g, requires_grad=True)
    s = torch.rand(5, 6, generator=g, requires_grad=True)
    tie = torch.zeros(5, 6, dtype=torch.bool)
    with torch.no_grad():
        s[0, 0] = 0.5  # a score exactly at the threshold, kept by the tie mask
    tie[0, 0] = True
    out = masked_weight(w, s, 0.5, tie)
    up = torch.randn(5, 6, generator=g)
    (out * up).sum().backward()
    keep = (s.detach() > 0.5) | tie
    assert torch.equal(out.detach(), w.detach() * keep)
    assert torch.allclose(w.grad, up * keep)
    assert torch.allclose(s.grad, up * w.detach())  # straight through the threshold


def test_embedding_masks_only_the_looked_up_rows_with_the_same_result():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0)
    scores = torch.rand(20, 6, requires_grad=True)
    ids = torch.tensor([[1, 2, 0], [5, 5, 19]])
    full = emb.weight.detach() * (scores.detach() > 0.5)
    fm = ForwardMasks(emb, ["weight"], effective=lambda n, w, rows=None: masked_weight(
        w, scores if rows is None else nn.functional.embedding(rows, scores), 0.5))  # fmt: skip
    out = emb(ids)
    assert torch.equal(out.detach(), full[ids])
    out.sum().backward()
    expected = torch.zeros(20, 6)
    expected.index_add_(0, ids.reshape(-1), emb.weight.detach()[ids.reshape(-1)])
    assert torch.allclose(scores.grad, expected)  # straight through, summed over repeats
    fm.bake()
    fm.remove()
    assert torch.equal(emb.weight.detach(), full)
