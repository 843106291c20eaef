"""Physical removal of heads and FFN units: the reduced model computes what the masked model
computed, loses exactly the expected parameters, keeps a valid anatomy, and round-trips its
state dict; bad requests are refused before anything changes."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from vlcompress.compress.structured import (
    kept_indices,
    remove_ffn_units,
    remove_heads,
    sliced_linear,
)
from vlcompress.data import VLBatch
from vlcompress.models.anatomy import Anatomy, AttentionSpec, Modality, anatomy_of
from vlcompress.models.anatomy.tiny import TINY_MODELS, TinyModel, tensors_of
from vlcompress.models.mcan import MCAN


def _mcan(seed: int = 0) -> TinyModel:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (3, 6), generator=g)
    ids[0, 4:] = 0
    batch = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(3, 5, 16, generator=g),
                    visual_mask=torch.tensor([[True] * 5, [True] * 5, [True] * 3 + [False] * 2]))  # fmt: skip
    return TinyModel("mcan", MCAN.from_variant("tiny", 30, 7).eval(), (batch,), source="vlcompress")


BUILDERS = {"mcan": _mcan}
if __import__("importlib").util.find_spec("transformers") is not None:
    # separate layouts (BERT, LXMERT with its bidirectional cross-attention, CLIP) and the
    # fused qkv of timm's ViT
    BUILDERS.update({k: TINY_MODELS[k] for k in ("bert", "lxmert", "clip_vision", "timm_vit")})


def _anatomy(model: nn.Module) -> Anatomy:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anatomy_of(model)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plan(anatomy: Anatomy, seed: int = 0):
    """Random float masks: block i keeps 1 + i % num_heads heads (so some keep all, some one)
    and about half of its FFN units."""
    g = torch.Generator().manual_seed(seed)
    heads = {}
    for i, a in enumerate(anatomy.attentions):
        mask = torch.zeros(a.num_heads)
        mask[torch.randperm(a.num_heads, generator=g)[: 1 + i % a.num_heads]] = 1.0
        heads[a.name] = mask
    units = {}
    for f in anatomy.ffns:
        mask = torch.zeros(f.inner_dim)
        mask[torch.randperm(f.inner_dim, generator=g)[: f.inner_dim // 2 + 1]] = 1.0
        units[f.name] = mask
    return heads, units


def _linear_rows_cost(layer: nn.Linear) -> int:
    return layer.in_features + (layer.bias is not None)


def _expected_drop(model: nn.Module, anatomy: Anatomy, heads, units) -> int:
    """Parameters that removal must free, computed from the dense model's layer shapes."""
    total = 0
    for a in anatomy.attentions:
        gone = int((heads[a.name] == 0).sum()) * a.head_dim
        out = model.get_submodule(a.out)
        total += gone * out.out_features
        if a.layout == "fused":
            total += 3 * gone * _linear_rows_cost(model.get_submodule(a.v))
        else:
            total += sum(gone * _linear_rows_cost(model.get_submodule(p)) for p in (a.q, a.k, a.v))
    for f in anatomy.ffns:
        gone = int((units[f.name] == 0).sum())
        up, down = model.get_submodule(f.up), model.get_submodule(f.down)
        total += gone * (_linear_rows_cost(up) + down.out_features)
    return total


def _close(a, b, atol: float = 1e-5) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=atol, msg=k)


@pytest.fixture(params=list(BUILDERS))
def case(request) -> TinyModel:
    return BUILDERS[request.param]()


def test_removal_equals_masking(case: TinyModel):
    model, anatomy = case.model, _anatomy(case.model)
    heads, units = _plan(anatomy)
    with torch.no_grad():
        dense = case.run()
        handles = anatomy.mask_heads(model, heads) + anatomy.mask_ffn_units(model, units)
        masked = case.run()
    for h in handles:
        h.remove()
    before = _count(model)
    expected = _expected_drop(model, anatomy, heads, units)

    by_heads = remove_heads(model, anatomy, heads)
    by_units = remove_ffn_units(model, by_heads.anatomy, units)
    with torch.no_grad():
        reduced = case.run()

    _close(reduced, masked)
    pairs = zip(tensors_of(reduced).values(), tensors_of(dense).values())
    assert any(not torch.allclose(x, y, atol=1e-4) for x, y in pairs)  # the removal mattered
    assert expected > 0
    assert before - _count(model) == expected
    assert by_heads.removed_parameters + by_units.removed_parameters == expected
    assert by_heads.kept == {n: torch.nonzero(m).flatten().tolist() for n, m in heads.items()}

    # The returned anatomy describes the reduced model, and is the one anatomy_of derives.
    new = by_units.anatomy
    new.validate(model)
    for a in anatomy.attentions:
        assert new.attention(a.name).num_heads == int(heads[a.name].sum())
        assert new.attention(a.name).head_dim == a.head_dim
    for f in anatomy.ffns:
        assert new.ffn(f.name).inner_dim == int(units[f.name].sum())
    derived = _anatomy(model)
    assert [(a.name, a.num_heads, a.head_dim) for a in derived.attentions] == [
        (a.name, a.num_heads, a.head_dim) for a in new.attentions
    ]
    assert [(f.name, f.inner_dim) for f in derived.ffns] == [
        (f.name, f.inner_dim) for f in new.ffns
    ]
    # The stale anatomy no longer matches; the new one still masks the reduced model.
    with pytest.raises(ValueError, match="does not match"):
        anatomy.validate(model)
    block = max(new.attentions, key=lambda a: a.num_heads)
    mask = torch.ones(block.num_heads)
    mask[0] = 0.0
    (handle,) = new.mask_heads(model, {block.name: mask})
    with torch.no_grad():
        again = case.run()
    handle.remove()
    assert any(not torch.equal(x, y) for x, y in zip(tensors_of(again).values(),
                                                     tensors_of(reduced).values()))  # fmt: skip


def test_removing_nothing_is_identity(case: TinyModel):
    model, anatomy = case.model, _anatomy(case.model)
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        before = case.run()
    r1 = remove_heads(
        model, anatomy, {a.name: list(range(a.num_heads)) for a in anatomy.attentions}
    )
    r2 = remove_ffn_units(
        model, r1.anatomy, {f.name: torch.ones(f.inner_dim) for f in anatomy.ffns}
    )
    assert r1.removed_parameters == r2.removed_parameters == 0
    assert {n: p for n, p in model.named_parameters()} == params  # the very same tensors
    with torch.no_grad():
        after = case.run()
    _close(after, before, atol=0)
    assert r2.anatomy.attentions == anatomy.attentions and r2.anatomy.ffns == anatomy.ffns
    assert r2.anatomy is not anatomy


def test_state_dict_round_trips_into_a_fresh_model():
    case = _mcan(seed=0)
    anatomy = _anatomy(case.model)
    heads, units = _plan(anatomy, seed=3)
    r1 = remove_heads(case.model, anatomy, heads)
    r2 = remove_ffn_units(case.model, r1.anatomy, units)
    buffer = io.BytesIO()
    torch.save(case.model.state_dict(), buffer)

    # A fresh dense model (other weights) takes the reduced shapes from the recorded plan.
    fresh = _mcan(seed=1)
    f1 = remove_heads(fresh.model, _anatomy(fresh.model), r1.kept)
    remove_ffn_units(fresh.model, f1.anatomy, r2.kept)
    with torch.no_grad():
        assert not torch.equal(fresh.run(), case.run())
    buffer.seek(0)
    fresh.model.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh.run(), case.run(), rtol=0, atol=0)


def test_reduced_model_trains():
    case = _mcan()
    anatomy = _anatomy(case.model)
    heads, units = _plan(anatomy)
    remove_ffn_units(case.model, remove_heads(case.model, anatomy, heads).anatomy, units)
    case.model.train()
    case.run().sum().backward()
    grads = [p.grad for p in case.model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads[:10])
    assert case.model.encoder[0].attn.q.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- building blocks
def test_kept_indices_accepts_masks_and_indices():
    assert kept_indices(torch.tensor([1.0, 0.0, 0.5]), 3, "b") == [0, 2]
    assert kept_indices(torch.tensor([False, True]), 2, "b") == [1]
    assert kept_indices(torch.tensor([2, 0]), 3, "b") == [0, 2]
    assert kept_indices((3, 1), 4, "b") == [1, 3]
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        kept_indices(torch.ones(4), 3, "block x")
    with pytest.raises(ValueError, match="out of range"):
        kept_indices([0, 3], 3, "b")
    with pytest.raises(ValueError, match="repeat"):
        kept_indices([1, 1], 3, "b")
    with pytest.raises(TypeError, match="must be ints"):
        kept_indices([0.0, 1.0], 3, "b")
    with pytest.raises(TypeError, match="mask tensor or a sequence"):
        kept_indices("01", 3, "b")


def test_sliced_linear_keeps_dtype_grad_flag_and_draws_no_random_numbers():
    layer = nn.Linear(5, 6).to(torch.float64)
    layer.weight.requires_grad_(False)
    state = torch.random.get_rng_state()
    rows = sliced_linear(layer, torch.tensor([4, 1]), 0)
    cols = sliced_linear(layer, torch.tensor([0, 3, 4]), 1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert rows.weight.dtype == cols.weight.dtype == torch.float64
    assert not rows.weight.requires_grad and rows.bias.requires_grad
    torch.testing.assert_close(rows.weight, layer.weight[[4, 1]], rtol=0, atol=0)
    torch.testing.assert_close(rows.bias, layer.bias[[4, 1]], rtol=0, atol=0)
    torch.testing.assert_close(cols.weight, layer.weight[:, [0, 3, 4]], rtol=0, atol=0)
    torch.testing.assert_close(cols.bias, layer.bias, rtol=0, atol=0)


# ---------------------------------------------------------------------- refusals
def _unchanged(model: nn.Module):
    return {n: p for n, p in model.named_parameters()}


def test_removing_every_head_or_unit_is_refused_before_any_change():
    case = _mcan()
    model, anatomy = case.model, _anatomy(case.model)
    params = _unchanged(model)
    first, second = anatomy.attentions[0], anatomy.attentions[1]
    with pytest.raises(ValueError, match="removes all 4 heads; keep at least one"):
        remove_heads(model, anatomy, {first.name: [0, 1], second.name: torch.zeros(4)})
    with pytest.raises(ValueError, match="removes all 64 units"):
        remove_ffn_units(model, anatomy, {anatomy.ffns[0].name: []})
    assert _unchanged(model) == params  # the valid first block was not touched either


def test_unknown_block_and_active_masks_are_refused():
    case = _mcan()
    model, anatomy = case.model, _anatomy(case.model)
    with pytest.raises(KeyError, match="known"):
        remove_heads(model, anatomy, {"encoder.9.attn": [0]})
    a, f = anatomy.attentions[0], anatomy.ffns[0]
    handles = anatomy.mask_heads(model, {a.name: torch.tensor([1.0, 0.0, 1.0, 1.0])})
    handles += anatomy.mask_ffn_units(model, {f.name: torch.ones(f.inner_dim)})
    with pytest.raises(ValueError, match="active heads mask; remove it first"):
        remove_heads(model, anatomy, {a.name: [0, 2, 3]})
    with pytest.raises(ValueError, match="active units mask"):
        remove_ffn_units(model, anatomy, {f.name: [0, 1]})
    for h in handles:
        h.remove()
    remove_heads(model, anatomy, {a.name: [0, 2, 3]})  # fine once the masks are gone


def test_stale_anatomy_is_refused_for_units():
    case = _mcan()
    model, anatomy = case.model, _anatomy(case.model)
    f = anatomy.ffns[0]
    remove_ffn_units(model, anatomy, {f.name: list(range(10))})
    with pytest.raises(ValueError, match="use the anatomy\\s+of the model as it is now"):
        remove_ffn_units(model, anatomy, {f.name: list(range(5))})


class _Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def test_packed_layout_and_wrapped_linears_are_refused():
    model = _Packed()
    spec = AttentionSpec("attn", 2, 4, "attn", "attn", "attn", "attn.out_proj",
                         Modality.LANGUAGE, layout="packed")  # fmt: skip
    with pytest.raises(ValueError, match="packed.*Supported layouts: 'separate', 'fused'"):
        remove_heads(model, Anatomy(attentions=[spec]), {"attn": [0]})

    case = _mcan()
    model, anatomy = case.model, _anatomy(case.model)
    f = anatomy.ffns[0]
    nn.utils.parametrize.register_parametrization(
        model.get_submodule(f.up), "weight", nn.Identity()
    )
    with pytest.raises(TypeError, match="parametrization.*remove_parametrizations"):
        remove_ffn_units(model, anatomy, {f.name: [0]})


def test_attention_without_a_head_count_attribute_is_refused():
    case = _mcan()
    model, anatomy = case.model, _anatomy(case.model)
    a = anatomy.attentions[0]
    block = model.get_submodule(a.name)
    block.__dict__["heads"] = block.__dict__.pop("num_heads")  # a name we do not know
    with pytest.raises(ValueError, match="head-count attribute"):
        remove_heads(model, anatomy, {a.name: [0]})
