"""The anatomy: coverage of MCAN, and — through the anatomy alone — listing prunable weights
per modality, switching off a head, masking FFN units, bypassing a layer, reading hidden
states; pattern-built anatomies for foreign models and automatic Hugging Face BERT support."""

import pytest
import torch
from torch import nn

from vlcompress.data import VLBatch
from vlcompress.models import AnatomyPatterns, Modality, anatomy_of, build_model
from vlcompress.models.mcan import MultiHeadAttention


@pytest.fixture
def mcan():
    torch.manual_seed(0)
    return build_model("mcan_tiny", 30, 7).eval()


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
