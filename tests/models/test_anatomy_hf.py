"""Anatomy v2 on every recognised model (tiny random configs, seeded, eval mode): coverage,
head and FFN-unit masks for every projection layout, bypassing every layer through the
model's real call signature, read-outs, prunable weights per modality, wrapped models."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from vlcompress.models.anatomy import (  # noqa: E402
    Anatomy,
    AttentionSpec,
    LayerBypass,
    Modality,
    Stream,
    anatomy_of,
)
from vlcompress.models.anatomy.tiny import TINY_MODELS, TinyModel, tensors_of  # noqa: E402

L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS

MODALITIES = {
    "bert": {L},
    "roberta": {L},
    "lxmert": {L, V, X},
    "visual_bert": {X},
    "vilt": {X},
    "clip_vision": {V},
    "clip_text": {L},
    "bridgetower": {L, V, X},
    "timm_vit": {V},
}
NAMES = list(TINY_MODELS)


@pytest.fixture(params=NAMES)
def case(request) -> TinyModel:
    return TINY_MODELS[request.param]()


def _anatomy(case: TinyModel) -> Anatomy:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no coverage warning for a recognised model
        return anatomy_of(case.model)


def _assert_same(a, b) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


def _changed(a, b) -> bool:
    ta, tb = tensors_of(a), tensors_of(b)
    return any(not torch.allclose(ta[k], tb[k]) for k in ta if ta[k].is_floating_point())


def _loss(output) -> torch.Tensor:
    """A loss on the hidden states (not on attention probabilities, which a dead head still
    computes)."""
    tensors = tensors_of(output).items()
    return sum(t.pow(2).mean() for k, t in tensors if t.requires_grad and "attentions" not in k)


def _one_per_group(items, key):
    seen = {}
    for item in items:
        seen.setdefault(key(item), item)
    return list(seen.values())


def test_every_model_is_recognised_with_full_coverage(case):
    an = _anatomy(case)
    report = an.coverage(case.model)
    assert report.fraction >= 0.99, str(report)
    assert set(an.modalities) == MODALITIES[case.name]
    assert set(report.by_modality) - {Modality.HEAD} >= MODALITIES[case.name]
    # Every declared layer is in exactly one stack, stacks in run order.
    assert sorted(n for s in an.stacks.values() for n in s) == sorted(x.name for x in an.layers)
    for names in an.stacks.values():
        assert [an.layer(n).index for n in names] == list(range(len(names)))


def test_mask_one_head_every_layout(case):
    an = _anatomy(case)
    model = case.model
    base = case.run()
    groups = _one_per_group(
        an.attentions, lambda a: (a.modality, a.query_side, a.key_side, a.kind, a.layout)
    )
    for spec in groups:
        mask = torch.ones(spec.num_heads)
        mask[1] = 0
        (handle,) = an.mask_heads(model, {spec.name: mask})
        model.zero_grad(set_to_none=True)
        masked = case.run()
        assert _changed(masked, base), spec.name
        _loss(masked).backward()
        rows = an.head_weights(model, spec.name, 1)
        other = an.head_weights(model, spec.name, 0)
        for role in ("q", "k"):
            w, idx = rows[role]
            assert w.grad[idx].abs().sum() == 0, f"{spec.name}: dead head's {role} rows learn"
            w0, idx0 = other[role]
            assert w0.grad[idx0].abs().sum() > 0, f"{spec.name}: live head's {role} rows frozen"
        handle.remove()
        with torch.no_grad():
            _assert_same(case.run(), base)


def test_mask_ffn_units(case):
    an = _anatomy(case)
    model = case.model
    with torch.no_grad():
        base = case.run()
        for spec in _one_per_group(an.ffns, lambda f: (f.modality, f.side)):
            seen = {}
            down = model.get_submodule(spec.down)
            hook = down.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__("y", o))
            (handle,) = an.mask_ffn_units(model, {spec.name: torch.zeros(spec.inner_dim)})
            masked = case.run()
            hook.remove()
            assert _changed(masked, base), spec.name
            torch.testing.assert_close(seen["y"], down.bias.expand_as(seen["y"]))
            handle.remove()
            _assert_same(case.run(), base)


def test_bypass_every_layer_and_restore(case):
    an = _anatomy(case)
    model = case.model
    with torch.no_grad():
        base = case.run()
        originals = {name: an.bypass_layer(model, name) for s in an.stacks.values() for name in s}
        assert all(isinstance(model.get_submodule(n), LayerBypass) for n in originals)
        skipped = case.run()
        # Same structure and shapes; a skipped layer has no attention probabilities (None).
        a, b = tensors_of(skipped), tensors_of(base)
        b = {k: t for k, t in b.items() if "attentions" not in k}
        assert a.keys() == b.keys()
        assert {k: t.shape for k, t in a.items()} == {k: t.shape for k, t in b.items()}
        assert _changed(skipped, base)
        for name, original in originals.items():
            an.replace_layer(model, name, original)
        _assert_same(case.run(), base)


def test_masks_of_a_bypassed_layer_wait_for_its_return(case):
    """Head and FFN-unit masks on a layer, then bypassing it: forwards run (the masks have
    nothing to act on, and their witnesses stay quiet) and give the plain bypass's output;
    restoring the layer brings the masked behaviour back."""
    an = _anatomy(case)
    model = case.model
    with torch.no_grad():
        base = case.run()
        for names in an.stacks.values():
            layer = an.layer(names[len(names) // 2])
            original = an.bypass_layer(model, layer.name)
            skipped = case.run()
            an.replace_layer(model, layer.name, original)
            heads = {a: torch.eye(an.attention(a).num_heads)[1] for a in layer.attentions}
            units = {f: torch.zeros(an.ffn(f).inner_dim) for f in layer.ffns}
            handles = an.mask_heads(model, heads) + an.mask_ffn_units(model, units)
            masked = case.run()
            assert _changed(masked, base), layer.name
            original = an.bypass_layer(model, layer.name)
            _assert_same(case.run(), skipped)
            an.replace_layer(model, layer.name, original)
            _assert_same(case.run(), masked)
            for h in handles:
                h.remove()
            _assert_same(case.run(), base)


def test_capture_every_readout(case):
    an = _anatomy(case)
    with torch.no_grad(), an.capture(case.model) as states:
        case.run()
    assert set(states) == set(an.readouts)
    assert all(isinstance(t, torch.Tensor) for t in states.values())
    for layer in an.layers:
        assert states[layer.name].shape[-1] == states[layer.name].shape[-1] > 1


def test_prunable_weights_per_modality(case):
    an = _anatomy(case)
    weights = an.prunable_weights(case.model)
    assert set(weights) >= MODALITIES[case.name]
    params = dict(case.model.named_parameters())
    every = [n for w in weights.values() for n in w]
    assert len(every) == len(set(every))
    for name in every:
        assert params[name].dim() >= 2, name
        assert not any(k in name for k in ("bias", "norm", "LayerNorm", "ln_", "position",
                                            "token_type", "pos_embed", "cls_token")), name  # fmt: skip
        assert not any(name.startswith(h + ".") for h in an.head_modules), name
    # Every projection of every declared block is prunable, under the block's group.
    for spec in an.attentions:
        group = weights[spec.modality]
        if spec.layout == "packed":
            assert f"{spec.v}.in_proj_weight" in group and f"{spec.out}.weight" in group
        else:
            assert all(f"{p}.weight" in group for p in spec.projections)
    for spec in an.ffns:
        assert f"{spec.up}.weight" in weights[spec.modality]


@pytest.mark.parametrize("name", ["bert", "clip_vision", "vilt", "visual_bert"])
@pytest.mark.parametrize("hooks_first", [True, False])
def test_hidden_states_tuple_keeps_its_length(name, hooks_first):
    case = TINY_MODELS[name]()
    an = _anatomy(case)
    with torch.no_grad():
        if hooks_first:  # transformers installs its recording hooks on the first request
            base = case.run(output_hidden_states=True).hidden_states
        stack = next(iter(an.stacks.values()))
        an.bypass_layer(case.model, stack[1])
        hidden = case.run(output_hidden_states=True).hidden_states
    assert len(hidden) == len(stack) + 1
    torch.testing.assert_close(hidden[2], hidden[1])
    if hooks_first:
        assert len(base) == len(hidden)


def test_lxmert_two_stream_layers():
    case = TINY_MODELS["lxmert"]()
    an = _anatomy(case)
    x0, x1 = an.stacks["encoder.x_layers"]
    layer = an.layer(x1)
    assert layer.streams == ("lang_feats", "visual_feats") and layer.stream_sides == (L, V)
    cross = an.attention(f"{x1}.visual_attention")
    assert (cross.kind, cross.query_side, cross.key_side, cross.bidirectional) == (
        "cross",
        L,
        V,
        True,
    )
    assert an.attention(f"{x1}.visn_self_att").query_side is V
    assert {f.side for f in an.ffns if f.name.startswith(x1)} == {L, V}
    assert layer.output == (Stream(0), Stream(1), None)  # declared: attentions asked or not
    fresh = _anatomy(case)
    fresh.layers = [dataclasses.replace(x, output=None) for x in fresh.layers]
    learned = fresh.learn_calls(case.model, *case.args, **case.kwargs)
    assert learned[x1] == (Stream(0), Stream(1))
    assert learned["encoder.layer.0"] == (Stream(0),)  # LxmertLayer returns a 1-tuple
    an.bypass_layer(case.model, x1)
    with torch.no_grad(), an.capture(case.model, [f"{x0}.language", f"{x0}.vision"]) as states:
        out = case.run()
    torch.testing.assert_close(out.language_output, states[f"{x0}.language"])
    torch.testing.assert_close(out.vision_output, states[f"{x0}.vision"])
    # One adapter per stream: the language stream goes through it, the vision stream does not.
    adapter = nn.Linear(32, 32)
    an.bypass_layer(case.model, x1, (adapter, None))
    with torch.no_grad(), an.capture(case.model, [f"{x0}.language", f"{x0}.vision"]) as states:
        out = case.run()
        torch.testing.assert_close(out.language_output, adapter(states[f"{x0}.language"]))
    torch.testing.assert_close(out.vision_output, states[f"{x0}.vision"])
    with pytest.raises(ValueError, match="one module"):
        an.bypass_layer(case.model, x1, (adapter,))


@pytest.mark.parametrize("name", ["lxmert", "vilt", "visual_bert", "bert", "bridgetower"])
def test_bypassed_layers_serve_output_attentions(name):
    case = TINY_MODELS[name]()
    an = _anatomy(case)
    for stack in an.stacks.values():
        an.bypass_layer(case.model, stack[-1])
    with torch.no_grad():
        case.run()  # a lazily learned structure is learned here, without attentions
        out = case.run(output_attentions=True)
    assert tensors_of(out)


def test_learned_structures_spare_the_probe():
    case = TINY_MODELS["bert"]()
    an = _anatomy(case)
    learned = an.learn_calls(case.model, *case.args, **case.kwargs)
    assert set(learned.values()) == {Stream(0)}  # BertLayer returns a bare tensor
    bypass = an.bypass_layer(case.model, "encoder.layer.1") and case.model.encoder.layer[1]
    assert bypass.output_template == Stream(0) and bypass._original is None


def test_packed_attention_declared_as_separate_is_an_error():
    case = TINY_MODELS["bridgetower"]()
    an = _anatomy(case)
    packed = next(a for a in an.attentions if a.layout == "packed")
    wrong = AttentionSpec(packed.name, packed.num_heads, packed.head_dim, packed.q, packed.k,
                          packed.v, packed.out, packed.modality)  # fmt: skip
    an.attentions[an.attentions.index(packed)] = wrong
    mask = torch.ones(packed.num_heads)
    mask[0] = 0
    (handle,) = an.mask_heads(case.model, {packed.name: mask})
    with pytest.raises(RuntimeError, match="did not take effect"):
        case.run()
    handle.remove()
    case.run()


@pytest.mark.parametrize(
    ("cls", "core", "head"),
    [("ViltForQuestionAnswering", "vilt", "classifier"),
     ("BertForSequenceClassification", "bert", "classifier"),
     ("LxmertForQuestionAnswering", "lxmert", "answer_head")],
)  # fmt: skip
def test_wrapped_models_are_recognised(cls, core, head):
    import transformers

    base = TINY_MODELS[{"vilt": "vilt", "bert": "bert", "lxmert": "lxmert"}[core]]()
    config = base.model.config
    config.num_labels = 3
    if core == "lxmert":
        config.num_qa_labels = 3
    model = getattr(transformers, cls)(config).eval()
    an = _anatomy(TinyModel(cls, model))
    assert all(x.name.startswith(f"{core}.") for x in an.layers)
    assert an.head_modules == [head]
    assert an.coverage(model).fraction == 1.0
    assert not any(n.startswith(head) for w in an.prunable_weights(model).values() for n in w)


def test_low_coverage_warns_or_raises(caplog):
    case = TINY_MODELS["clip_text"]()
    holder = nn.Module()
    holder.text = case.model
    holder.extra = nn.Linear(300, 300)  # undeclared, larger than the text model
    with pytest.warns(UserWarning, match=r"extra \(90,300\)") as caught:
        an = anatomy_of(holder)
    assert len(caught) == 1 and not caplog.records  # said once, as a warning only
    assert an.coverage(holder).uncovered[0] == ("extra", 90_300)
    with pytest.raises(ValueError, match="min_coverage"):
        anatomy_of(holder, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anatomy_of(holder, min_coverage=0.1)


def test_real_timm_vision_transformer():
    pytest.importorskip("timm")
    from vlcompress.models.anatomy.tiny import _timm_vit

    case = _timm_vit(replica=False)
    an = _anatomy(case)
    assert {a.layout for a in an.attentions} == {"fused"}
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    base = case.run()
    (handle,) = an.mask_heads(case.model, {an.attentions[0].name: mask})
    assert not torch.allclose(case.run(), base)
    handle.remove()


def test_clip_composites_are_covered():
    import transformers as T

    text = TINY_MODELS["clip_text"]().model.config
    vision = TINY_MODELS["clip_vision"]().model.config
    models = [
        T.CLIPModel(T.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict())),
        T.CLIPVisionModelWithProjection(vision),
        T.CLIPTextModelWithProjection(text),
    ]
    for model in models:
        an = _anatomy(TinyModel(type(model).__name__, model))
        assert an.coverage(model).fraction == 1.0
    assert set(anatomy_of(models[0]).modalities) == {L, V}
