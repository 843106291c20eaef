"""The anatomy: coverage of MCAN, and — through the anatomy alone — listing prunable weights
per modality, switching off a head, masking FFN units, bypassing a layer, reading hidden
states; pattern-built anatomies for foreign models (separate, fused and packed projections,
two-stream layers) and automatic Hugging Face BERT support. Needs no transformers except for
the BERT test; ``test_anatomy_hf.py`` covers every recognised model."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from vlcompress.data import VLBatch
from vlcompress.models.anatomy import (
    Anatomy,
    AnatomyPatterns,
    AttentionSpec,
    FFNSpec,
    LayerBypass,
    LayerSpec,
    Modality,
    Stream,
    anatomy_of,
    recognise,
)
from vlcompress.models.anatomy.tiny import TimmStyleViT
from vlcompress.models.mcan import MCAN, MultiHeadAttention

L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS


@pytest.fixture
def mcan():
    torch.manual_seed(0)
    return MCAN.from_variant("tiny", 30, 7).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 30, (2, 6), generator=g)
    return VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.randn(2, 5, 16, generator=g))


def test_mcan_anatomy_covers_every_block(mcan):
    an = anatomy_of(mcan)
    an.validate(mcan)
    modules = dict(mcan.named_modules())
    attn_modules = {n for n, m in modules.items() if isinstance(m, MultiHeadAttention)}
    assert {a.name for a in an.attentions} == attn_modules
    layer_modules = {f"encoder.{i}" for i in range(2)} | {f"decoder.{i}" for i in range(2)}
    assert {layer.name for layer in an.layers} == layer_modules
    # Every Linear inside a layer is a q/k/v/out projection or an FFN projection.
    declared = {p for a in an.attentions for p in (a.q, a.k, a.v, a.out)} | {
        p for f in an.ffns for p in (f.up, f.down)
    }
    inside = {
        n
        for n, m in modules.items()
        if isinstance(m, nn.Linear) and n.split(".")[0] in ("encoder", "decoder")
    }
    assert inside == declared
    assert an.stacks == {
        "encoder": ["encoder.0", "encoder.1"],
        "decoder": ["decoder.0", "decoder.1"],
    }
    assert {a.kind for a in an.attentions if a.name.endswith("guided_attn")} == {"cross"}
    # v2: the side of every block.
    guided = an.attention("decoder.0.guided_attn")
    assert (guided.modality, guided.query_side, guided.key_side) == (X, V, L)
    own = an.attention("decoder.0.self_attn")
    assert (own.kind, own.modality, own.query_side, own.key_side) == ("self", X, V, V)
    assert (an.attention("encoder.1.attn").query_side, an.ffn("decoder.1.ffn").side) == (L, V)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert anatomy_of(mcan, strict=True).coverage(mcan).fraction == 1.0


def test_prunable_weights_per_modality(mcan):
    weights = anatomy_of(mcan).prunable_weights(mcan)
    assert set(weights) == {Modality.LANGUAGE, Modality.VISION, Modality.CROSS}
    lang, vis, cross = weights[Modality.LANGUAGE], weights[Modality.VISION], weights[Modality.CROSS]
    assert (
        "embedding.weight" in lang
        and "encoder.0.attn.q.weight" in lang
        and "encoder.1.ffn.down.weight" in lang
    )
    assert "visual.proj.weight" in vis
    assert "decoder.0.guided_attn.k.weight" in cross
    every = [n for w in weights.values() for n in w]
    assert len(every) == len(set(every))  # no weight in two modalities
    assert not any(n.endswith("bias") or "norm" in n or n.startswith("classifier") for n in every)
    params = dict(mcan.named_parameters())
    assert all(w is params[n] for ws in weights.values() for n, w in ws.items())  # the real tensors


def test_switch_off_one_head(mcan, batch):
    an = anatomy_of(mcan)
    spec = an.attention("encoder.0.attn")
    seen = {}
    hook = mcan.get_submodule(spec.out).register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", a[0].detach())
    )
    base = mcan(batch)
    assert seen["x"][..., spec.head_dim : 2 * spec.head_dim].abs().sum() > 0
    mask = torch.ones(spec.num_heads)
    mask[1] = 0
    handles = an.mask_heads(mcan, {"encoder.0.attn": mask})
    masked = mcan(batch)
    head1 = seen["x"][..., spec.head_dim : 2 * spec.head_dim]
    assert head1.abs().sum() == 0  # head 1's context is gone ...
    assert seen["x"][..., : spec.head_dim].abs().sum() > 0  # ... the others are not
    assert not torch.allclose(masked, base)
    # A dead head passes no gradient to its own query rows.
    mcan.zero_grad()
    masked.sum().backward()
    q_grad = mcan.get_submodule(spec.q).weight.grad
    assert q_grad[spec.head_dim : 2 * spec.head_dim].abs().sum() == 0
    assert q_grad[: spec.head_dim].abs().sum() > 0
    for h in handles:
        h.remove()
    hook.remove()
    torch.testing.assert_close(mcan(batch), base)


def test_mask_ffn_units(mcan, batch):
    an = anatomy_of(mcan)
    spec = an.ffn("encoder.0.ffn")
    out = {}
    mcan.get_submodule(spec.name).register_forward_hook(
        lambda m, a, o: out.__setitem__("y", o.detach())
    )
    an.mask_ffn_units(mcan, {spec.name: torch.zeros(spec.inner_dim)})
    mcan(batch)
    bias = mcan.get_submodule(spec.down).bias.detach()
    torch.testing.assert_close(out["y"], bias.expand_as(out["y"]))
    with pytest.raises(ValueError, match="shape"):
        an.mask_ffn_units(mcan, {spec.name: torch.zeros(3)})


def test_bypass_layer_and_restore(mcan, batch):
    an = anatomy_of(mcan)
    base = mcan(batch)
    original = an.bypass_layer(mcan, "decoder.1")
    with an.capture(mcan, ["decoder.0", "decoder.1"]) as states:
        skipped = mcan(batch)
    torch.testing.assert_close(
        states["decoder.1"], states["decoder.0"]
    )  # the layer is an identity now
    assert not torch.allclose(skipped, base)
    # With an adapter, the bypass routes the hidden states through it.
    adapter = nn.Linear(32, 32)
    an.bypass_layer(mcan, "decoder.1", adapter)
    with an.capture(mcan, ["decoder.0", "decoder.1"]) as states:
        mcan(batch)
    torch.testing.assert_close(states["decoder.1"], adapter(states["decoder.0"]))
    an.replace_layer(mcan, "decoder.1", original)
    torch.testing.assert_close(mcan(batch), base)


def test_masks_of_a_bypassed_layer_wait_for_its_return(mcan, batch):
    an = anatomy_of(mcan)
    with torch.no_grad():
        base = mcan(batch)
        for name in ("encoder.1", "decoder.1"):
            layer = an.layer(name)
            original = an.bypass_layer(mcan, name)
            skipped = mcan(batch)
            an.replace_layer(mcan, name, original)
            heads = {a: torch.tensor([1.0, 0.0, 1.0, 1.0]) for a in layer.attentions}
            units = {f: torch.zeros(an.ffn(f).inner_dim) for f in layer.ffns}
            handles = an.mask_heads(mcan, heads) + an.mask_ffn_units(mcan, units)
            masked = mcan(batch)
            assert not torch.allclose(masked, base)
            original = an.bypass_layer(mcan, name)
            torch.testing.assert_close(mcan(batch), skipped, rtol=0, atol=0)
            an.replace_layer(mcan, name, original)
            torch.testing.assert_close(mcan(batch), masked, rtol=0, atol=0)
            for h in handles:
                h.remove()
            torch.testing.assert_close(mcan(batch), base, rtol=0, atol=0)


def test_capture_readouts(mcan, batch):
    an = anatomy_of(mcan)
    with an.capture(mcan) as states:
        mcan(batch)
    assert states["encoder.1"].shape == (2, 6, 32) and states["decoder.1"].shape == (2, 5, 32)
    assert states["language_input"].shape == (2, 6, 32) and states["fused"].shape == (2, 64)
    with pytest.raises(KeyError, match="no read-out"):
        with an.capture(mcan, ["nope"]):
            pass


class ForeignBlock(nn.Module):
    """A transformer block from 'someone else's project', with its own names."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.mix = nn.Module()
        self.mix.n_head = heads
        self.mix.wq, self.mix.wk, self.mix.wv, self.mix.proj = (nn.Linear(d, d) for _ in range(4))
        self.mlp_in, self.mlp_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads
        q, k, v = (
            f(x).view(b, t, h, d // h).transpose(1, 2)
            for f in (self.mix.wq, self.mix.wk, self.mix.wv)
        )
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // h) ** 0.5, -1) @ v
        x = x + self.mix.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(torch.relu(self.mlp_in(x)))


class ForeignModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.blocks = nn.ModuleList(ForeignBlock() for _ in range(3))

    def forward(self, x):
        for blk in self.backbone.blocks:
            x = blk(x)
        return x


def test_anatomy_from_patterns_for_a_foreign_model():
    torch.manual_seed(0)
    model = ForeignModel()
    with pytest.raises(TypeError, match="declares no anatomy"):
        anatomy_of(model)
    patterns = AnatomyPatterns(
        layer=r"^backbone\.blocks\.(?P<index>\d+)$", attention="mix", q="mix.wq", k="mix.wk",
        v="mix.wv", out="mix.proj", ffn_up="mlp_in", ffn_down="mlp_out", num_heads_attr="n_head",
        modality=((r"blocks\.2", Modality.CROSS),),
    )  # fmt: skip
    an = anatomy_of(model, patterns)
    an.validate(model)
    assert an.stacks == {"backbone.blocks": [f"backbone.blocks.{i}" for i in range(3)]}
    assert an.attentions[0].num_heads == 2 and an.attentions[0].head_dim == 8
    assert an.layer("backbone.blocks.2").modality is Modality.CROSS
    x = torch.randn(2, 4, 16)
    base = model(x)
    an.mask_heads(model, {"backbone.blocks.0.mix": torch.tensor([1.0, 0.0])})
    assert not torch.allclose(model(x), base)
    # A masked layer's FFN is "<layer>.ffn" (watched at the layer); bypassing it is fine.
    an.mask_ffn_units(model, {"backbone.blocks.1.ffn": torch.zeros(64)})
    masked = model(x)
    original = an.bypass_layer(model, "backbone.blocks.1")
    assert not torch.allclose(model(x), masked)
    an.replace_layer(model, "backbone.blocks.1", original)
    torch.testing.assert_close(model(x), masked, rtol=0, atol=0)


def test_a_bypassed_layer_that_is_its_attention_block_keeps_its_head_mask():
    """The head mask's witness sits on the layer itself, whose hooks the bypass shares."""
    torch.manual_seed(0)
    model = ForeignModel()
    p = "backbone.blocks.1"
    an = Anatomy(
        attentions=[AttentionSpec(p, 2, 8, f"{p}.mix.wq", f"{p}.mix.wk", f"{p}.mix.wv",
                                  f"{p}.mix.proj", L)]
    )  # fmt: skip
    an.add_layer(LayerSpec(p, "backbone.blocks", 1, L, (p,), ()))
    x = torch.randn(2, 4, 16)
    an.mask_heads(model, {p: torch.tensor([1.0, 0.0])})
    masked = model(x)
    original = an.bypass_layer(model, p)
    assert not torch.allclose(model(x), masked)
    an.replace_layer(model, p, original)
    torch.testing.assert_close(model(x), masked, rtol=0, atol=0)


def test_a_look_alike_of_a_recognised_class_is_skipped_with_one_warning(caplog):
    class BertModel(nn.Module):  # the name of a recognised class, not its modules
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(4, 4)

    holder = nn.Module()
    holder.bert = BertModel()
    with pytest.warns(UserWarning, match="it is skipped") as caught:
        assert recognise(holder) is None
    assert len(caught) == 1 and not caplog.records


def test_huggingface_bert_is_recognised_automatically():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    an = anatomy_of(model)
    an.validate(model)
    assert [layer.name for layer in an.layers] == [f"encoder.layer.{i}" for i in range(3)]
    assert all(a.num_heads == 4 and a.head_dim == 8 for a in an.attentions)
    assert an.ffns[0].inner_dim == 48
    ids = torch.randint(0, 60, (2, 7))
    base = model(input_ids=ids).last_hidden_state
    lang = an.prunable_weights(model)[Modality.LANGUAGE]
    assert (
        "encoder.layer.0.attention.self.query.weight" in lang
        and "encoder.layer.2.output.dense.weight" in lang
    )
    # Switch off a head: output changes; bypass the last layer: output = layer 1's output.
    handles = an.mask_heads(
        model, {"encoder.layer.0.attention": torch.tensor([1.0, 0.0, 1.0, 1.0])}
    )
    assert not torch.allclose(model(input_ids=ids).last_hidden_state, base)
    for h in handles:
        h.remove()
    an.bypass_layer(model, "encoder.layer.2")
    with an.capture(model, ["encoder.layer.1"]) as states:
        out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, states["encoder.layer.1"])


def test_removing_a_head_mask_restores_the_previous_one(mcan, batch):
    an = anatomy_of(mcan)
    first = torch.tensor([1.0, 0.0, 1.0, 1.0])
    an.mask_heads(mcan, {"encoder.0.attn": first})
    with_first = mcan(batch)
    (handle,) = an.mask_heads(mcan, {"encoder.0.attn": torch.tensor([0.0, 1.0, 1.0, 1.0])})
    assert not torch.allclose(mcan(batch), with_first)
    handle.remove()
    torch.testing.assert_close(mcan(batch), with_first)  # the first mask is back, not "no mask"


def test_prunable_weights_skip_position_embeddings_of_the_grid_stem():
    torch.manual_seed(0)
    model = MCAN.from_variant("tiny", 30, 7, visual_input="grid").eval()
    vis = anatomy_of(model).prunable_weights(model)[V]
    assert "visual.pos" not in vis and "visual.proj.weight" in vis
    assert any(n.startswith("visual.convs.") for n in vis)


def test_a_wrapper_of_a_declared_model_gets_its_anatomy(mcan, batch):
    task = nn.Module()  # e.g. a LightningModule holding the model
    task.model, task.classifier = mcan, nn.Linear(7, 2)
    an = anatomy_of(task)
    assert an.stacks["model.encoder"] == ["model.encoder.0", "model.encoder.1"]
    assert an.head_modules == ["model.classifier", "classifier"]
    assert an.coverage(task).fraction == 1.0
    with an.capture(task, ["model.decoder.1"]) as states:
        mcan(batch)
    assert states["model.decoder.1"].shape == (2, 5, 32)


def test_native_head_mask_stack(mcan, batch):
    an = anatomy_of(mcan)
    attn = mcan.get_submodule("encoder.0.attn")
    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 1.0])
    (ha,) = an.mask_heads(mcan, {"encoder.0.attn": a})
    (hb,) = an.mask_heads(mcan, {"encoder.0.attn": b})
    assert attn.head_mask is b
    ha.remove()  # removing an older mask keeps the newest one
    assert attn.head_mask is b
    hb.remove()
    assert attn.head_mask is None


# ---------------------------------------------------------------------- fused qkv (timm)
def _assert_dead_head_gets_no_gradient(an, model, name: str, dead: int) -> None:
    """Head ``dead`` of block ``name`` has no gradient in its q, k, v rows; head 0 does."""
    for role in ("q", "k", "v"):
        w, idx = an.head_weights(model, name, dead)[role]
        assert w.grad[idx].abs().sum() == 0
    w, idx = an.head_weights(model, name, 0)["q"]
    assert w.grad[idx].abs().sum() > 0


def test_fused_qkv_replica_of_timm():
    """The timm layout (``blocks.N.attn.qkv``) without timm: the recogniser, a head mask on
    the fused projection (dead head's q and k rows get exactly zero gradient), FFN units,
    bypass through ``nn.Sequential`` blocks."""
    torch.manual_seed(0)
    model = TimmStyleViT().eval()
    x = torch.randn(2, 3, 32, 32)
    an = anatomy_of(model)
    spec = an.attention("blocks.1.attn")
    assert (spec.layout, spec.num_heads, spec.head_dim, spec.q) == (
        "fused",
        4,
        8,
        "blocks.1.attn.qkv",
    )
    assert an.head_modules == ["head"]
    assert "blocks.0.attn.qkv.weight" in an.prunable_weights(model)[V]
    base = model(x)
    seen = {}
    model.blocks[1].attn.proj.register_forward_hook(lambda m, a, o: seen.__setitem__("ctx", a[0]))
    (handle,) = an.mask_heads(model, {spec.name: torch.tensor([1.0, 0.0, 1.0, 1.0])})
    out = model(x)
    assert seen["ctx"][..., 8:16].abs().sum() == 0 and seen["ctx"][..., :8].abs().sum() > 0
    out.pow(2).sum().backward()
    _assert_dead_head_gets_no_gradient(an, model, spec.name, dead=1)
    handle.remove()
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    original = an.bypass_layer(model, "blocks.1")
    with torch.no_grad(), an.capture(model, ["blocks.0", "blocks.1"]) as states:
        model(x)
    torch.testing.assert_close(states["blocks.1"], states["blocks.0"])
    an.replace_layer(model, "blocks.1", original)
    torch.testing.assert_close(model(x), base, rtol=0, atol=0)


# ---------------------------------------------------------------------- packed (nn.MultiheadAttention)
class PackedBlock(nn.Module):
    """A pre-norm block around ``nn.MultiheadAttention`` (as in CLIP's OpenAI code)."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc, self.proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, key_padding_mask=None):
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False, key_padding_mask=key_padding_mask)[0]
        return x + self.proj(torch.relu(self.fc(x)))


def _packed_model():
    torch.manual_seed(0)
    model = nn.Module()
    model.blocks = nn.ModuleList(PackedBlock() for _ in range(2))
    patterns = AnatomyPatterns(
        layer=r"^blocks\.(?P<index>\d+)$", attention="attn", q="attn", k="attn", v="attn",
        out="attn.out_proj", ffn_up="fc", ffn_down="proj", layout="packed",
        modality=((r".", V),),
    )  # fmt: skip
    return model, anatomy_of(model, patterns, min_coverage=0.0)


@pytest.mark.parametrize("grad", [True, False])
def test_packed_multihead_attention_head_mask(grad):
    model, an = _packed_model()
    model.eval()
    spec = an.attention("blocks.0.attn")
    assert (spec.num_heads, spec.head_dim) == (4, 4)
    weights = an.prunable_weights(model)[V]
    assert "blocks.0.attn.in_proj_weight" in weights and "blocks.0.attn.out_proj.weight" in weights

    def run():
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
        for blk in model.blocks:
            x = blk(x)
        return x

    with torch.set_grad_enabled(grad):  # without grad, MHA takes its fused fast path
        base = run()
        (handle,) = an.mask_heads(model, {spec.name: torch.tensor([1.0, 1.0, 0.0, 1.0])})
        masked = run()
    assert not torch.allclose(masked, base)
    assert set(dict(model.named_parameters())) == {n for n, _ in model.named_parameters()}
    assert "blocks.0.attn.in_proj_weight" in dict(model.named_parameters())  # names unchanged
    if grad:
        masked.pow(2).sum().backward()
        _assert_dead_head_gets_no_gradient(an, model, spec.name, dead=2)
    handle.remove()
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(run(), base, rtol=0, atol=0)
    assert "in_proj_weight" not in vars(model.blocks[0].attn)  # no shadow left behind


def test_a_head_mask_that_cannot_take_effect_is_an_error():
    model, an = _packed_model()
    spec = an.attention("blocks.0.attn")
    wrong = AttentionSpec(
        spec.name, 4, 4, "blocks.0.fc", "blocks.0.fc", "blocks.0.fc", spec.out, V
    )  # fmt: skip — declared separate: out_proj never called
    an.attentions[0] = wrong
    (handle,) = an.mask_heads(model, {spec.name: torch.tensor([1.0, 0.0, 1.0, 1.0])})
    with pytest.raises(RuntimeError, match="did not take effect.*out_proj"):
        model.blocks[0](torch.randn(2, 5, 16))
    handle.remove()
    model.blocks[0](torch.randn(2, 5, 16))


# ---------------------------------------------------------------------- two streams
class CoAttentionLayer(nn.Module):
    """METER-style co-attention: two streams in (by keyword), both out, vision first."""

    def __init__(self, d=16):
        super().__init__()
        self.text_to_image = nn.MultiheadAttention(d, 2, batch_first=True)
        self.image_to_text = nn.MultiheadAttention(d, 2, batch_first=True)
        self.text_ffn, self.image_ffn = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, text, image, text_mask=None):
        t = text + self.text_to_image(text, image, image, need_weights=False)[0]
        i = (
            image
            + self.image_to_text(image, text, text, need_weights=False, key_padding_mask=text_mask)[
                0
            ]
        )
        return {"image": i + self.image_ffn(i), "text": t + self.text_ffn(t)}


class CoAttentionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(CoAttentionLayer() for _ in range(2))

    def forward(self, text, image):
        for layer in self.layers:
            out = layer(text=text, image=image)
            text, image = out["text"], out["image"]
        return text, image

    def anatomy(self):
        an = Anatomy()
        for i in range(2):
            p = f"layers.{i}"
            for name, q, k in (("text_to_image", L, V), ("image_to_text", V, L)):
                a = f"{p}.{name}"
                an.attentions.append(AttentionSpec(a, 2, 8, a, a, a, f"{a}.out_proj", X, "cross",
                                                   q, k, layout="packed"))  # fmt: skip
            an.add_layer(LayerSpec(p, "layers", i, X, (f"{p}.text_to_image", f"{p}.image_to_text"),
                                   streams=("text", "image"), stream_sides=(L, V)))  # fmt: skip
        return an


def test_two_stream_layer_learns_its_output_structure():
    torch.manual_seed(0)
    model = CoAttentionModel().eval()
    text, image = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    an = anatomy_of(model, min_coverage=0.5)
    assert an.readouts["layers.0.vision"] == "layers.0#1"
    learned = an.learn_calls(model, text, image)  # streams passed by keyword, dict output
    assert learned["layers.1"] == {"image": Stream(1), "text": Stream(0)}
    with torch.no_grad():
        first = model.layers[0](text=text, image=image)
        an.bypass_layer(model, "layers.1")
        t, i = model(text, image)
    torch.testing.assert_close(t, first["text"])
    torch.testing.assert_close(i, first["image"])
    # Streams of one shape cannot be told apart by learning: an error, not a guess.
    with pytest.raises(ValueError, match="cannot tell which"):
        fresh = CoAttentionModel()
        anatomy_of(fresh, min_coverage=0.5).learn_calls(fresh, text, image[:, :4])
    assert an.bypassed(model) == ["layers.1"]
    an.validate(model)  # the blocks of a bypassed layer are not missing, they are skipped
    with pytest.raises(ValueError, match="bypassed"):
        an.mask_heads(model, {"layers.1.text_to_image": torch.ones(2)})


def test_skip_in_place_learns_the_output_structure_once(monkeypatch):
    torch.manual_seed(0)
    model = CoAttentionModel().eval()
    text, image = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    an = anatomy_of(model, min_coverage=0.5)
    assert an.layer("layers.1").output is None  # not declared: learned on the first skip
    calls = []
    forward = CoAttentionLayer.forward
    monkeypatch.setattr(CoAttentionLayer, "forward",
                        lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))  # fmt: skip
    with torch.no_grad():
        full = model(text, image)
        for _ in range(3):  # skip, run, run back to full: the structure is learned only once
            an.skip_layer(model, "layers.1")
            assert an.skipped(model) == ["layers.1"]
            calls.clear()
            t, i = model(text, image)
            first = model.layers[0](text=text, image=image)
            an.unskip_layer(model, "layers.1")
            torch.testing.assert_close(t, first["text"])
            torch.testing.assert_close(i, first["image"])
            # layer 0 twice, plus once to learn layer 1's structure the first time only
            assert len(calls) == (3 if _ == 0 else 2)
        again = model(text, image)
    torch.testing.assert_close(again[0], full[0], rtol=0, atol=0)


def test_bypassed_models_copy_and_pickle(mcan, batch):
    an = anatomy_of(mcan)
    an.bypass_layer(mcan, "decoder.1", nn.Linear(32, 32))
    with torch.no_grad():
        out = mcan(batch)
        clone = copy.deepcopy(mcan)
        torch.testing.assert_close(clone(batch), out)
        restored = pickle.loads(pickle.dumps(mcan))
        torch.testing.assert_close(restored(batch), out)
    assert isinstance(restored.decoder[1], LayerBypass) and isinstance(
        restored.decoder[1], type(mcan.decoder[0])
    )
    assert "decoder.1.adapters.0.weight" in mcan.state_dict()


class PlainBlock(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.functional = nn.Linear(8, 16), nn.Linear(16, 8), functional

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.functional:
            return x + nn.functional.linear(h, self.fc2.weight, self.fc2.bias)
        return x + self.fc2(h)


@pytest.mark.parametrize("functional", [False, True])
def test_an_ffn_named_after_its_down_projection(functional):
    """The block's name is its down projection's path: the layer is the witness."""
    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList([PlainBlock(functional)])
    an = Anatomy(ffns=[FFNSpec("layers.0.fc2", "layers.0.fc1", "layers.0.fc2", 16, L)])
    an.add_layer(LayerSpec("layers.0", "layers", 0, L, (), ("layers.0.fc2",)))
    an.validate(model)
    x = torch.randn(2, 3, 8)
    (handle,) = an.mask_ffn_units(model, {"layers.0.fc2": torch.zeros(16)})
    if functional:
        with pytest.raises(RuntimeError, match="did not take effect"):
            model.layers[0](x)
    else:
        torch.testing.assert_close(model.layers[0](x), x + model.layers[0].fc2.bias)
    handle.remove()
    model.layers[0](x)


def test_declarations_are_checked():
    with pytest.raises(ValueError, match="layout"):
        AttentionSpec("a", 2, 4, "a.q", "a.k", "a.v", "a.o", L, layout="stacked")
    with pytest.raises(ValueError, match="same path"):
        AttentionSpec("a", 2, 4, "a.q", "a.k", "a.v", "a.o", L, layout="fused")
    with pytest.raises(ValueError, match="stream 1"):
        LayerSpec("l", "s", 0, L, output=(Stream(0), Stream(1)))
    with pytest.raises(ValueError, match="stream_sides"):
        LayerSpec("l", "s", 0, L, streams=(0, 1), stream_sides=(L,))
    assert FFNSpec("f", "u", "d", 4, X, V).side is V


def test_masks_survive_a_deep_copy():
    torch.manual_seed(0)
    model = TimmStyleViT().eval()
    an = anatomy_of(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(x)
        (handle,) = an.mask_heads(model, {"blocks.0.attn": torch.tensor([0.0, 1.0, 1.0, 1.0])})
        masked = model(x)
        clone = copy.deepcopy(model)
        torch.testing.assert_close(clone(x), masked, rtol=0, atol=0)
        handle.remove()  # the original only
        torch.testing.assert_close(model(x), base, rtol=0, atol=0)
        torch.testing.assert_close(clone(x), masked, rtol=0, atol=0)
        (other,) = an.mask_heads(clone, {"blocks.0.attn": torch.tensor([1.0, 1.0, 0.0, 1.0])})
        assert not torch.allclose(clone(x), masked)
        other.remove()  # the copied mask applies again
        torch.testing.assert_close(clone(x), masked, rtol=0, atol=0)
