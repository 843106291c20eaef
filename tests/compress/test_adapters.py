"""Parallel and skip bottleneck adapters (seed 002, DAS) on every model family, through the
anatomy: sizes as the seed's, positions as the seed's, zero-init adapters that start exactly as
the backbone, and detaching that leaves the model as it was."""

import inspect

import pytest
import torch
from torch import nn

from vlcompress.compress.adapters import BottleneckAdapter, adapter_sites, add_parallel_adapters
from vlcompress.data import VLBatch
from vlcompress.models import build_model
from vlcompress.models.anatomy import anatomy_of
from vlcompress.models.anatomy.tiny import TINY_MODELS, tensors_of

FAMILIES = ["bert", "vilt", "lxmert", "bridgetower"]


def _n(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_adapter_sizes_are_the_seeds():
    # ANCHORS, seed 002: parallel 149,856, skip 297,408 (ViLT) / 444,960 (METER) at D = 768
    assert _n(BottleneckAdapter(768, 96)) == 149_856
    assert _n(BottleneckAdapter(768, 192, residual=True)) == 297_408
    assert _n(BottleneckAdapter(768, 288, residual=True)) == 444_960


def test_adapter_init_and_residual():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    seed = BottleneckAdapter(16, 4)
    assert seed.up.weight.std().item() == pytest.approx(0.02, rel=0.5) and seed(x).abs().sum() > 0
    assert torch.equal(seed.down.bias, torch.zeros(4))
    zero = BottleneckAdapter(16, 4, init="zero", residual=True)
    torch.testing.assert_close(zero(x), x)  # a skip adapter that starts as the identity
    with pytest.raises(ValueError, match="init"):
        BottleneckAdapter(16, 4, init="xavier")


def _sites(model):
    return {s.name: s.how for s in adapter_sites(model, anatomy_of(model))}


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_adapters_start_as_the_backbone_and_detach_cleanly(family):
    case = TINY_MODELS[family]()
    model, anatomy = case.model, anatomy_of(case.model)
    before = tensors_of(case.run())
    keys = set(model.state_dict())
    added = add_parallel_adapters(model, anatomy, bottleneck=8, init="zero")
    per_layer = {s.layer for s in added.sites}
    assert per_layer == {x.name for x in anatomy.layers}
    assert len(added.adapters) == sum(len(x.attentions) + len(x.ffns) for x in anatomy.layers)
    assert set(model.state_dict()) == keys  # nothing added to the model
    for k, v in tensors_of(case.run()).items():
        torch.testing.assert_close(v, before[k], msg=k)
    # a trained (non-zero) adapter changes the output, and the loss reaches every adapter
    for a in added.adapters.values():
        nn.init.normal_(a.up.weight, std=0.02)
    out = tensors_of(case.run())
    assert any(not torch.allclose(out[k], before[k]) for k in before)
    sum(v.float().pow(2).sum() for v in out.values()).backward()
    for key, a in added.adapters.items():
        assert a.up.weight.grad is not None and a.up.weight.grad.abs().sum() > 0, key
    added.remove()
    for k, v in tensors_of(case.run()).items():
        torch.testing.assert_close(v, before[k], msg=k)


def test_bert_post_norm_positions():
    case = TINY_MODELS["bert"]()
    model = case.model
    sites = _sites(model)
    assert sites["encoder.layer.0.attention"] == "inside_norm"
    assert sites["encoder.layer.0.ffn"] == "after_output"
    added = add_parallel_adapters(model, anatomy_of(model), bottleneck=8)
    a_attn = added.adapters["encoder/layer/0/attention"]
    a_ffn = added.adapters["encoder/layer/0/ffn"]
    layer = model.encoder.layer[0]
    h = torch.randn(2, 5, model.config.hidden_size)
    got = layer(h)
    got = got[0] if isinstance(got, tuple) else got
    added.remove()  # the reference below calls the sublayers without the hooks
    att = layer.attention
    ctx = att.self(h)[0]
    h1 = att.output.LayerNorm(att.output.dense(ctx) + h + a_attn(h))  # inside the LayerNorm
    inter = layer.intermediate(h1)
    want = layer.output.LayerNorm(layer.output.dense(inter) + h1) + a_ffn(h1)  # after it
    torch.testing.assert_close(got, want)


def test_vilt_pre_norm_positions_read_the_unnormalised_input():
    case = TINY_MODELS["vilt"]()
    model = case.model
    sites = _sites(model)
    assert sites["encoder.layer.0.attention"] == "layer_input"
    assert sites["encoder.layer.0.ffn"] == "after_output"
    added = add_parallel_adapters(model, anatomy_of(model), bottleneck=8)
    a0 = added.adapters["encoder/layer/0/attention"]
    a1 = added.adapters["encoder/layer/0/ffn"]
    layer = model.encoder.layer[0]
    x = torch.randn(2, 5, model.config.hidden_size)
    got = layer(x)[0]
    added.remove()
    x1 = x + layer.attention(layer.layernorm_before(x))[0] + a0(x)  # x + Attn(LN1 x) + A0(x)
    mlp = layer.output.dense(layer.intermediate(layer.layernorm_after(x1)))
    torch.testing.assert_close(got, x1 + mlp + a1(x1))  # x + MLP(LN2 x) + A1(x)


def _region_batch(b=3, n=5, t=6, d=16, vocab=30):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    ids[0, 4:] = 0
    box = torch.rand(b, n, 2, generator=g) * 0.5
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, n, d, generator=g),
        boxes=torch.cat([box, box + 0.5], -1), targets=torch.zeros(b, 7),
        question_id=torch.arange(b), question_type=["q"] * b, answers=[["a"]] * b,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["mcan_tiny", "uniter_tiny"])
def test_our_models(name):
    model = build_model(name, 30, 7).eval()
    anatomy = anatomy_of(model)
    batch = _region_batch(d=getattr(model.options, "region_dim", None) or 16)
    before = model(batch)
    added = add_parallel_adapters(model, anatomy, bottleneck=4, init="zero")
    torch.testing.assert_close(model(batch), before)
    if name == "mcan_tiny":  # MCAN: post-norm, plain modules: adapters beside each block
        assert set(_sites(model).values()) == {"layer_input", "own_input", "ffn_input"}
        a0, a1 = added.adapters["encoder/0/attn"], added.adapters["encoder/0/ffn"]
        for a in (a0, a1):
            nn.init.normal_(a.up.weight, std=0.02)
        layer = model.encoder[0]
        x = torch.randn(2, 4, model.options.hidden_size)
        got = layer(x, None)
        added.remove()
        h1 = layer.norm1(x + layer.attn(x, x, x, None, None) + a0(x))
        torch.testing.assert_close(got, layer.norm2(h1 + layer.ffn(h1) + a1(h1)))
    added.remove()
    torch.testing.assert_close(model(batch), before)


@pytest.mark.parametrize("family", ["vilt", "lxmert"])
def test_skip_adapter_stands_in_for_a_layer(family):
    case = TINY_MODELS[family]()
    model, anatomy = case.model, anatomy_of(case.model)
    before = tensors_of(case.run())
    keys = set(model.state_dict())
    spec = anatomy.layers[-1]
    dim = model.config.hidden_size
    adapters = [BottleneckAdapter(dim, 8, init="zero", residual=True) for _ in spec.streams]
    seen = []
    layer = model.get_submodule(spec.name)
    hook = layer.register_forward_hook(
        lambda m, a, k, out: seen.append((a, k, out)), with_kwargs=True
    )
    anatomy.skip_layer(model, spec.name)
    plain = tensors_of(case.run())  # skipped without adapters
    anatomy.skip_layer(model, spec.name, adapters)  # zero adapters: the same as plain skipping
    for k, v in tensors_of(case.run()).items():
        torch.testing.assert_close(v, plain[k], msg=k)
    for a in adapters:
        nn.init.normal_(a.up.weight, std=0.02)
    out = tensors_of(case.run())
    assert any(not torch.allclose(out[k], plain[k]) for k in plain)
    sum(v.float().pow(2).sum() for v in out.values()).backward()
    assert all(a.up.weight.grad.abs().sum() > 0 for a in adapters)  # every stream's adapter
    # the layer's output is its input streams through the adapters, in the layer's structure
    args, kwargs, output = seen[-1]
    bound = inspect.signature(type(layer).forward).bind(layer, *args, **kwargs).arguments
    names = list(bound)[1:]
    inputs = [bound[names[s]] if isinstance(s, int) else bound[s] for s in spec.streams]
    for i, (x, a) in enumerate(zip(inputs, adapters)):
        torch.testing.assert_close(output[i], x + a.up(torch.relu(a.down(a.norm(x)))))
    assert set(model.state_dict()) == keys
    assert anatomy.skipped(model) == [spec.name]
    anatomy.unskip_layer(model, spec.name)
    hook.remove()
    for k, v in tensors_of(case.run()).items():
        torch.testing.assert_close(v, before[k], msg=k)
    with pytest.raises(ValueError, match="stream"):
        anatomy.skip_layer(model, spec.name, [None] * 3)


def test_install_adapters_makes_a_smaller_standalone_model():
    import copy

    from vlcompress.compress.adapters import install_adapters, key_of
    from vlcompress.utils.flops import count_compute

    case = TINY_MODELS["bert"]()
    model = case.model
    anatomy = anatomy_of(model)
    fresh = copy.deepcopy(model)
    skipped = anatomy.layers[1].name
    # the callback's way: hooked parallel adapters, the layer skipped in place with its adapter
    kept = [x.name for x in anatomy.layers if x.name != skipped]
    added = add_parallel_adapters(model, anatomy, bottleneck=8, layers=kept)
    skip_adapter = BottleneckAdapter(model.config.hidden_size, 12, residual=True)
    nn.init.normal_(skip_adapter.up.weight, std=0.02)
    anatomy.skip_layer(model, skipped, skip_adapter)
    want = tensors_of(case.run())
    weights = {f"parallel.{k}": v for k, v in added.adapters.state_dict().items()}
    weights.update(
        {f"skip_adapters.{key_of(skipped)}.{k}": v for k, v in skip_adapter.state_dict().items()}
    )
    spec = {"bottleneck": 8, "skipped": {skipped: 12}}
    standalone = install_adapters(copy.deepcopy(fresh), anatomy_of(fresh), spec, weights)
    case.model = standalone
    for k, v in tensors_of(case.run()).items():
        torch.testing.assert_close(v, want[k], msg=k)
    state = standalone.state_dict()
    assert not any(k.startswith(skipped + ".attention") for k in state)  # the layer is gone
    assert any(k.startswith("vlcompress_adapters.") for k in state)
    # it loads without the callback: rebuild, install, load the weights
    again = install_adapters(copy.deepcopy(fresh), anatomy_of(fresh), spec)
    again.load_state_dict(state)
    case.model = again
    for k, v in tensors_of(case.run()).items():
        torch.testing.assert_close(v, want[k], msg=k)
    full = count_compute(fresh, *case.args, **case.kwargs).macs
    assert count_compute(again, *case.args, **case.kwargs).macs < full
    with pytest.raises(KeyError, match="adapter weights"):
        install_adapters(
            copy.deepcopy(fresh), anatomy_of(fresh), spec, {"parallel.x.w": torch.ones(1)}
        )
