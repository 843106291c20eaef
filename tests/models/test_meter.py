"""METER: the published size, checkpoints in METER's Lightning layout (logits equal to a
functional re-implementation of METER's ``infer`` on the same tensors), pairs and the grown type
table, position interpolation, tower initialisation, errors, anatomy, skipping one fusion half,
adapters."""

import argparse
import dataclasses
import logging
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.compress.adapters import (
    BottleneckAdapter,
    adapter_sites,
    add_parallel_adapters,
    install_adapters,
)
from vlcompress.data import VLBatch
from vlcompress.encoders.clip_resnet import clip_input
from vlcompress.encoders.clip_vit import CLIPVisionTransformer
from vlcompress.models import Modality, anatomy_of, build_model
from vlcompress.models.meter import METER_VARIANTS, save_meter_checkpoint

TINY = METER_VARIANTS["meter_tiny"]
H = TINY.hidden_size
FUSION = [f"cross_modal_{s}_layers.{i}" for i in range(TINY.num_fusion_layers)
          for s in ("text", "image")]  # fmt: skip


def batch(b=3, t=7, vocab=50, images=1, size=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (b, t), generator=g)  # 0, 1: RoBERTa's <s> and padding
    ids[0, 5:] = 0
    shape = (b, 3, size, size) if images == 1 else (b, images, 3, size, size)
    return VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.rand(shape, generator=g))


def tiny(answers=7, **options):
    torch.manual_seed(0)
    return build_model("meter_tiny", 50, answers, **options).eval()


def meter_only():
    """Tensors of METER checkpoints that we do not use: CLIP's text-tower leftovers, RoBERTa's
    position buffer, pre-training heads."""
    g = torch.Generator().manual_seed(1)
    return {
        "vit_model.positional_embedding": torch.randn(77, 16, generator=g),
        "vit_model.ln_final.weight": torch.ones(16), "vit_model.ln_final.bias": torch.zeros(16),
        "text_transformer.embeddings.position_ids": torch.arange(34)[None],
        "itm_score.fc.weight": torch.randn(2, 2 * H, generator=g),
        "mlm_score.bias": torch.zeros(50),
    }  # fmt: skip


def meter_file(model, path, hyper_parameters=None):
    """``model`` saved as METER's Lightning checkpoint, with :func:`meter_only` tensors."""
    save_meter_checkpoint(model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"].update(meter_only())
    ckpt["hyper_parameters"] = hyper_parameters or {"config": {"image_size": 32}}
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------- METER's infer, functionally
def _lin(s, p, x):
    return F.linear(x, s[f"{p}.weight"], s[f"{p}.bias"])


def _ln(s, p, x, eps):
    return F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"], eps)


def _bert_attention(s, p, h, ctx, add, heads):
    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    q, k, v = (split(_lin(s, f"{p}.self.{n}", x)) for n, x in (("query", h), ("key", ctx), ("value", ctx)))  # fmt: skip
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + add
    c = (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)
    return _ln(s, f"{p}.output.LayerNorm", _lin(s, f"{p}.output.dense", c) + h, 1e-12)


def _cross_layer(s, p, x, y, x_add, y_add, heads):
    a = _bert_attention(s, f"{p}.attention", x, x, x_add, heads)
    c = _bert_attention(s, f"{p}.crossattention", a, y, y_add, heads)
    f = F.gelu(_lin(s, f"{p}.intermediate.dense", c))
    return _ln(s, f"{p}.output.LayerNorm", _lin(s, f"{p}.output.dense", f) + c, 1e-12)


def _clip_visual(s, pixels, o):
    p = "vit_model.visual"
    x = F.conv2d(pixels, s[f"{p}.conv1.weight"], stride=o.patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([s[f"{p}.class_embedding"].expand(len(x), 1, -1), x], 1)
    x = _ln(s, f"{p}.ln_pre", x + s[f"{p}.positional_embedding"], 1e-5).transpose(0, 1)
    for i in range(o.vision_layers):
        q = f"{p}.transformer.resblocks.{i}"
        h = _ln(s, f"{q}.ln_1", x, 1e-5)
        x = x + F.multi_head_attention_forward(
            h, h, h, o.vision_width, o.vision_heads, s[f"{q}.attn.in_proj_weight"],
            s[f"{q}.attn.in_proj_bias"], None, None, False, 0.0, s[f"{q}.attn.out_proj.weight"],
            s[f"{q}.attn.out_proj.bias"], need_weights=False,
        )[0]  # fmt: skip
        h = _lin(s, f"{q}.mlp.c_fc", _ln(s, f"{q}.ln_2", x, 1e-5))
        x = x + _lin(s, f"{q}.mlp.c_proj", h * torch.sigmoid(1.702 * h))
    return _ln(s, f"{p}.ln_post", x.transpose(0, 1), 1e-5)


def meter_infer(state, b, o, vocab=50):
    """METER's ``infer`` + head (``meter_module.py``, ``objectives.compute_nlvr2``) on the
    tensors of a METER state dict: RoBERTa's ids padded with its id 1, BERT's -10000 mask."""
    from transformers import RobertaModel

    roberta = RobertaModel(o.roberta_config(vocab)).eval()
    roberta.load_state_dict({k[17:]: v for k, v in state.items()
                             if k.startswith("text_transformer.") and "position_ids" not in k})  # fmt: skip
    ids = torch.where(b.text_mask, b.text_ids, 1)
    text = roberta(input_ids=ids, attention_mask=b.text_mask.long()).last_hidden_state
    text = (
        _lin(state, "cross_modal_text_transform", text) + state["token_type_embeddings.weight"][0]
    )
    text_add = (1.0 - b.text_mask[:, None, None, :].float()) * -10000.0
    images = b.visual if b.visual.dim() == 5 else b.visual[:, None]
    feats = []
    for i in range(images.shape[1]):
        pixels = clip_input(images[:, i], o.image_size)
        y = _lin(state, "cross_modal_image_transform", _clip_visual(state, pixels, o))
        x, y = text, y + state["token_type_embeddings.weight"][i + 1]
        for d in range(o.num_fusion_layers):
            x1 = _cross_layer(
                state, f"cross_modal_text_layers.{d}", x, y, text_add, 0.0, o.num_heads
            )
            y1 = _cross_layer(
                state, f"cross_modal_image_layers.{d}", y, x, 0.0, text_add, o.num_heads
            )
            x, y = x1, y1
        feats += [torch.tanh(_lin(state, f"cross_modal_{n}_pooler.dense", z[:, 0])) for n, z in (("text", x), ("image", y))]  # fmt: skip
    head = "nlvr2_classifier" if o.head == "pair" else "vqa_classifier"
    h = _ln(state, f"{head}.1", _lin(state, f"{head}.0", torch.cat(feats, -1)), 1e-5)
    return _lin(state, f"{head}.3", F.gelu(h))


# ---------------------------------------------------------------------- tests
def test_published_parameter_count():
    with torch.device("meta"):
        m = build_model("meter_clip16_roberta", 50265, 3129)
    parts = {n: sum(p.numel() for p in c.parameters()) for n, c in m.named_children()}
    lin = lambda i, o: i * o + o  # noqa: E731
    d, f = 768, 3072
    roberta_layer = 4 * lin(d, d) + lin(d, f) + lin(f, d) + 2 * 2 * d
    roberta = (50265 + 514 + 1) * d + 2 * d + 12 * roberta_layer + lin(d, d)  # + unused pooler
    clip_block = (3 * d * d + 3 * d) + lin(d, d) + lin(d, f) + lin(f, d) + 2 * 2 * d
    clip = 3 * 16 * 16 * d + d + (24 * 24 + 1) * d + 2 * d + 11 * clip_block + 2 * d
    cross = 2 * (4 * lin(d, d) + 2 * d) + lin(d, f) + lin(f, d) + 2 * d
    expected = {
        "text_transformer": roberta, "vit_model": clip,
        "cross_modal_text_transform": lin(d, d), "cross_modal_image_transform": lin(d, d),
        "token_type_embeddings": 2 * d, "cross_modal_image_layers": 6 * cross,
        "cross_modal_text_layers": 6 * cross, "cross_modal_image_pooler": lin(d, d),
        "cross_modal_text_pooler": lin(d, d),
        "vqa_classifier": lin(2 * d, 2 * d) + 2 * 2 * d + lin(2 * d, 3129), "fused": 0,
    }  # fmt: skip
    assert parts == expected
    total = sum(parts.values())
    assert total == sum(p.numel() for p in m.parameters())
    assert round(total / 1e6, 1) == 326.6  # METER-CLIP16-RoBERTa, 3,129 VQA answers, 384 px
    with torch.device("meta"):
        pair = build_model("meter_clip16_roberta", 50265, 2, head="pair")
    assert tuple(pair.token_type_embeddings.weight.shape) == (3, 768)
    assert [tuple(p.shape) for p in pair.nlvr2_classifier.parameters()] == [
        (1536, 3072), (1536,), (1536,), (1536,), (2, 1536), (2,)]  # fmt: skip


def test_a_meter_checkpoint_loads_and_gives_meters_logits(tmp_path, caplog):
    source = tiny()
    # Lightning pickles METER's hyper-parameters as an object: the file is unpickled in full.
    path = meter_file(source, tmp_path / "vqa.ckpt", argparse.Namespace(config={"vit": "ViT-B/16"}))
    state = torch.load(path, weights_only=False)["state_dict"]
    for key in ("vit_model.visual.transformer.resblocks.1.attn.in_proj_weight",
                "vit_model.visual.conv1.weight", "vit_model.visual.positional_embedding",
                "vit_model.visual.class_embedding", "vit_model.visual.ln_pre.weight",
                "vit_model.visual.ln_post.bias", "text_transformer.encoder.layer.1.output.dense.weight",
                "cross_modal_text_layers.1.crossattention.self.query.weight",
                "cross_modal_image_layers.0.attention.output.LayerNorm.weight",
                "cross_modal_text_pooler.dense.weight", "token_type_embeddings.weight",
                "vqa_classifier.3.weight"):  # fmt: skip
        assert key in state, key
    assert "vit_model.visual.transformer.resblocks.2.ln_1.weight" not in state  # last block dropped
    with caplog.at_level(logging.INFO, logger="vlcompress.models.meter"):
        ours = tiny(pretrained=str(path))
    assert f"ignoring {len(meter_only())} tensors" in caplog.text
    assert "unpickling it in full" in caplog.text
    b = batch()
    with torch.no_grad():
        logits = ours(b)
        torch.testing.assert_close(logits, source(b), atol=0, rtol=0)
        torch.testing.assert_close(logits, meter_infer(state, b, TINY), atol=1e-5, rtol=1e-4)
    # A checkpoint for other answers: the body loads, the head starts fresh.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vlcompress.models.meter"):
        other = tiny(answers=5, pretrained=str(path))
    assert "head starts fresh" in caplog.text
    assert torch.equal(
        other.cross_modal_text_pooler.dense.weight, source.cross_modal_text_pooler.dense.weight
    )


def test_a_pair_model_grows_the_type_table_and_reads_two_images(tmp_path, caplog):
    source = tiny()
    path = meter_file(source, tmp_path / "pretrain.ckpt")
    with caplog.at_level(logging.INFO, logger="vlcompress.models.meter"):
        pair = tiny(answers=2, head="pair", pretrained=str(path))
    assert "grown to 3 rows" in caplog.text and "head starts fresh" in caplog.text
    table = pair.token_type_embeddings.weight
    assert table.shape == (3, H)
    assert torch.equal(table[:2], source.token_type_embeddings.weight) and torch.equal(
        table[2], table[1]
    )
    assert pair.reads_pairs and pair.pooled_dim == 4 * H and not hasattr(pair, "vqa_classifier")
    b = batch(images=2)
    with torch.no_grad():
        logits, extras = pair(b, return_extras=True)
        assert logits.shape == (3, 2) and extras["pooled"].shape == (3, 4 * H)
        torch.testing.assert_close(logits, meter_infer(pair.state_dict(), b, pair.options),
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
        # pass 2 reads image 2 with type 2: swapping the images changes the answer
        swapped = VLBatch(text_ids=b.text_ids, text_mask=b.text_mask, visual=b.visual.flip(1))
        assert not torch.allclose(pair(swapped), logits)
    again = tiny(
        answers=2, head="pair", pretrained=str(save_meter_checkpoint(pair, tmp_path / "p.ckpt"))
    )
    with torch.no_grad():
        torch.testing.assert_close(again(b), logits, atol=0, rtol=0)


def test_forward_extras_and_padding():
    m = tiny()
    b = batch()
    with torch.no_grad():
        logits, extras = m(b, return_extras=True)
        hidden, _ = m.encode_text(b.text_ids, b.text_mask)
    assert logits.shape == (3, 7) and m.num_answers == 7 and m.vocab_size == 50
    assert extras["pooled"].shape == (3, m.pooled_dim) == (3, 2 * H)
    assert extras["question"].shape == (3, m.question_dim) == (3, TINY.text_hidden_size)
    w = b.text_mask[..., None].float()
    torch.testing.assert_close(extras["question"], (hidden * w).sum(1) / w.sum(1))
    wide = VLBatch(text_ids=torch.cat([b.text_ids, torch.zeros(3, 4, dtype=torch.long)], 1),
                   text_mask=torch.cat([b.text_mask, torch.zeros(3, 4, dtype=torch.bool)], 1),
                   visual=b.visual)  # fmt: skip
    with torch.no_grad():  # padding columns change nothing; 64 px images are resized to 32
        torch.testing.assert_close(m(wide), logits)
        big = F.interpolate(b.visual, size=(64, 64), mode="nearest")
        assert m(VLBatch(text_ids=b.text_ids, text_mask=b.text_mask, visual=big)).shape == (3, 7)


def test_padded_images_are_refused_and_whole_ones_read():
    """METER has no pixel mask: padding (images of different sizes padded to one, as nlvr2 and
    vqa_v2 serve them) would be stretched into the picture with the image."""
    m = tiny()
    b = batch()
    full = torch.ones(3, 32, 32, dtype=torch.bool)
    padded = full.clone()
    padded[1, :, 24:] = False
    with torch.no_grad():
        logits = m(b)
        torch.testing.assert_close(m(dataclasses.replace(b, visual_mask=full)), logits)
        with pytest.raises(ValueError, match=r"no pixel mask.*stretched.*one fixed square"):
            m(dataclasses.replace(b, visual_mask=padded))
        pair = tiny(answers=2, head="pair")
        p = batch(images=2)
        pmask = torch.ones(3, 2, 32, 32, dtype=torch.bool)
        pair(dataclasses.replace(p, visual_mask=pmask))
        pmask[0, 1, 30:] = False
        with pytest.raises(ValueError, match=r"no pixel mask.*padded to \(32, 32\)"):
            pair(dataclasses.replace(p, visual_mask=pmask))


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_meter_checkpoint(tiny(), tmp_path / "m.ckpt")
    before = path.read_bytes()
    real = torch.save

    def dies_half_way(obj, f, *a, **k):  # what a crash or a full disk leaves
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(b"half a checkpoint")
        else:
            f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        save_meter_checkpoint(tiny(answers=5), path)
    monkeypatch.setattr(torch, "save", real)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]
    again = tiny(answers=3)
    path = save_meter_checkpoint(again, path)  # replaced whole
    assert torch.load(path, weights_only=True)["state_dict"]["vqa_classifier.3.bias"].shape == (3,)


@pytest.mark.parametrize("before,after", [(16, 32), (32, 48)])
def test_position_tables_are_interpolated_bicubically(tmp_path, before, after):
    source = tiny(image_size=before)
    path = meter_file(source, tmp_path / "m.ckpt")
    m = tiny(image_size=after, pretrained=str(path))
    table = source.vit_model.visual.positional_embedding.detach()
    g0, g1 = before // 16, after // 16
    grid = table[1:].reshape(1, g0, g0, H).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
    expected = torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(g1 * g1, H)])
    torch.testing.assert_close(m.vit_model.visual.positional_embedding.detach(), expected)
    # Without resizing, a 32 px model reads 48 px images through the same interpolation.
    if before == 32:
        native = tiny(resize_images=False, pretrained=str(path))
        b = batch(size=after)
        with torch.no_grad():
            torch.testing.assert_close(native(b), m(b), atol=1e-5, rtol=1e-4)


def test_towers_start_from_roberta_and_clip_files(tmp_path):
    from transformers import RobertaForMaskedLM

    torch.manual_seed(0)
    rob = RobertaForMaskedLM(TINY.roberta_config(50))
    rob.save_pretrained(tmp_path / "roberta")  # the hub layout: roberta.* + lm_head.*
    clip = CLIPVisionTransformer(16, 16, 32, layers=3, heads=4, embed_dim=8)
    torch.save({f"visual.{k}": v for k, v in clip.state_dict().items()}, tmp_path / "ViT.pt")
    m = tiny(text_init=str(tmp_path / "roberta"), vision_init=str(tmp_path))
    for k, v in rob.roberta.state_dict().items():
        if not k.startswith("pooler."):
            assert torch.equal(m.text_transformer.state_dict()[k], v), k
    visual = m.vit_model.visual.state_dict()
    assert torch.equal(visual["transformer.resblocks.1.mlp.c_fc.weight"],
                       clip.state_dict()["transformer.resblocks.1.mlp.c_fc.weight"])  # fmt: skip
    assert "transformer.resblocks.2.ln_1.weight" not in visual  # the last block is dropped
    assert visual["positional_embedding"].shape == (1 + 2 * 2, 32)  # 16 px table -> 32 px
    with pytest.raises(ValueError, match=r"width: checkpoint 32, model 48"):
        tiny(vision_width=48, vision_init=str(tmp_path / "ViT.pt"))
    with pytest.raises(ValueError, match=r"num_hidden_layers: checkpoint 2, model 3"):
        tiny(text_layers=3, text_init=str(tmp_path / "roberta"))


def test_bad_checkpoints_inputs_and_options_are_explained(tmp_path):
    path = meter_file(tiny(), tmp_path / "m.ckpt")
    with pytest.raises(
        ValueError,
        match=r"intermediate\.dense\.weight: checkpoint \(64, 32\), model \(48, 32\) \(set model\.options\.ffn_size\)",
    ):
        tiny(ffn_size=48, pretrained=str(path))
    with pytest.raises(
        ValueError, match=r"unexpected \['cross_modal_image_layers\.1.*num_fusion_layers"
    ):
        tiny(num_fusion_layers=1, pretrained=str(path))
    with pytest.raises(FileNotFoundError, match=r"does not exist.*model\.options\.pretrained"):
        tiny(pretrained=str(tmp_path / "none.ckpt"))
    with pytest.raises(ValueError, match=r"head: pair answers True / False .* 7 answers"):
        tiny(head="pair")
    with pytest.raises(ValueError, match=r"image_size \(40\) must be a whole number of patches"):
        tiny(image_size=40)
    with pytest.raises(
        ValueError, match=r"hidden_size \(32\) must be divisible by num_heads \(3\)"
    ):
        tiny(num_heads=3)
    with pytest.raises(ValueError, match=r"either pretrained .* or text_init"):
        tiny(pretrained=str(path), text_init=str(tmp_path))
    m = tiny()
    with pytest.raises(
        ValueError, match=r"reads 1 image\(s\) per example, the batch has 2.*head: pair"
    ):
        m(batch(images=2))
    with pytest.raises(
        ValueError, match=r"reads 2 image\(s\) per example, the batch has 1.*head: vqa"
    ):
        tiny(answers=2, head="pair")(batch())
    regions = VLBatch(text_ids=torch.ones(2, 3, dtype=torch.long),
                      text_mask=torch.ones(2, 3, dtype=torch.bool), visual=torch.randn(2, 5, 16))  # fmt: skip
    with pytest.raises(ValueError, match=r"region features.*visual_features: pixels"):
        m(regions)
    with pytest.raises(ValueError, match=r"at most 32 tokens.*max_question_len.*max_text_len"):
        m(batch(t=40))


def test_anatomy_covers_everything():
    m = tiny()
    an = anatomy_of(m, strict=True)
    an.validate(m)
    assert an.coverage(m).fraction == 1.0
    assert an.stacks == {
        "text_transformer.encoder.layer": [f"text_transformer.encoder.layer.{i}" for i in range(2)],
        "vit_model.visual.transformer.resblocks": [f"vit_model.visual.transformer.resblocks.{i}" for i in range(2)],
        "cross_modal_text_layers": ["cross_modal_text_layers.0", "cross_modal_text_layers.1"],
        "cross_modal_image_layers": ["cross_modal_image_layers.0", "cross_modal_image_layers.1"],
    }  # fmt: skip
    modality = {x.name.split(".")[0]: x.modality for x in an.layers}
    assert modality == {"text_transformer": Modality.LANGUAGE, "vit_model": Modality.VISION,
                        "cross_modal_text_layers": Modality.CROSS,
                        "cross_modal_image_layers": Modality.CROSS}  # fmt: skip
    L, V = Modality.LANGUAGE, Modality.VISION
    for side, other, name in (
        (L, V, "cross_modal_text_layers.1"),
        (V, L, "cross_modal_image_layers.1"),
    ):
        layer = an.layer(name)
        assert layer.stream_sides == (side,) and len(layer.attentions) == 2
        own, cross = (an.attention(a) for a in layer.attentions)
        assert (own.kind, own.query_side, own.key_side) == ("self", side, side)
        assert (cross.kind, cross.query_side, cross.key_side) == ("cross", side, other)
        assert an.ffn(layer.ffns[0]).side == side
    assert an.attention("vit_model.visual.transformer.resblocks.0.attn").layout == "packed"
    assert an.head_modules == ["vqa_classifier"]
    weights = {n for ws in an.prunable_weights(m).values() for n in ws}
    assert "text_transformer.pooler.dense.weight" not in weights  # declared, never run
    assert (
        "vit_model.visual.conv1.weight" in weights
        and "cross_modal_image_transform.weight" in weights
    )
    with an.capture(
        m, ["language_input", "vision_input", "fused", "cross_modal_image_layers.1"]
    ) as seen:
        m(batch())
    assert seen["language_input"].shape == (3, 7, 32) and seen["vision_input"].shape == (3, 5, 32)
    assert seen["fused"].shape == (3, 2 * H) and seen["cross_modal_image_layers.1"].shape == (
        3,
        5,
        H,
    )
    pair = tiny(answers=2, head="pair")
    assert pair.anatomy().head_modules == ["nlvr2_classifier"]


def _record(model):
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, k, out, n=n: seen.__setitem__(n, (a, out)), with_kwargs=True) for n in FUSION]  # fmt: skip
    return seen, hooks


@pytest.mark.parametrize("how", ["skip", "bypass"])
def test_skipping_one_half_leaves_the_other_half_reading_its_input(how):
    m = tiny()
    an = m.anatomy()
    b = batch()
    seen, hooks = _record(m)
    with torch.no_grad():
        m(b)
    base = dict(seen)
    adapter = BottleneckAdapter(H, 8, residual=True)
    skipped = "cross_modal_text_layers.0"
    if how == "skip":
        an.skip_layer(m, skipped, adapter)
    else:
        original = an.bypass_layer(m, skipped, adapter)
    with torch.no_grad():
        m(b)
    (x0, y0, *_), out = seen[skipped]
    torch.testing.assert_close(x0, base[skipped][0][0])
    torch.testing.assert_close(out, adapter(x0))  # the half returns its input, adapted
    image = "cross_modal_image_layers.0"  # same depth: reads the text half's input, runs as before
    assert torch.equal(seen[image][0][1], x0)
    torch.testing.assert_close(seen[image][1], base[image][1], atol=0, rtol=0)
    torch.testing.assert_close(seen["cross_modal_text_layers.1"][0][0], out)  # next depth
    torch.testing.assert_close(seen["cross_modal_image_layers.1"][0][1], out)
    if how == "skip":
        assert an.skipped(m) == [skipped]
        an.unskip_layer(m, skipped)
    else:
        assert an.bypassed(m) == [skipped]
        an.replace_layer(m, skipped, original)
    with torch.no_grad():
        m(b)
    for n in FUSION:
        torch.testing.assert_close(seen[n][1], base[n][1], atol=0, rtol=0)
    for h in hooks:
        h.remove()


def test_parallel_adapters_and_installed_skips():
    m = tiny()
    an = anatomy_of(m)
    b = batch()
    with torch.no_grad():
        before = m(b)
    sites = {s.name: s.how for s in adapter_sites(m, an)}
    for stream in (
        "text",
        "image",
    ):  # METER's post-norm halves: inside both LayerNorms, after the FFN
        p = f"cross_modal_{stream}_layers.1"
        assert (sites[f"{p}.attention"], sites[f"{p}.crossattention"], sites[f"{p}.ffn"]) == (
            "inside_norm", "inside_norm", "after_output")  # fmt: skip
    assert sites["vit_model.visual.transformer.resblocks.0.attn"] == "layer_input"
    assert sites["text_transformer.encoder.layer.0.attention"] == "inside_norm"
    added = add_parallel_adapters(m, an, bottleneck=8, init="zero")
    assert len(added.adapters) == 2 * 2 + 2 * 2 + 4 * 3
    with torch.no_grad():
        torch.testing.assert_close(m(b), before, atol=0, rtol=0)  # zero init: the backbone
    for a in added.adapters.values():
        nn.init.normal_(a.up.weight, std=0.02)
    with torch.no_grad():
        assert not torch.allclose(m(b), before)
    added.remove()
    with torch.no_grad():
        torch.testing.assert_close(m(b), before, atol=0, rtol=0)
    params = sum(p.numel() for p in m.parameters())
    skipped = {"cross_modal_image_layers.1": 16, "vit_model.visual.transformer.resblocks.0": 16,
               "text_transformer.encoder.layer.1": 16}  # fmt: skip
    install_adapters(m, an, {"bottleneck": 8, "skipped": skipped})
    assert sorted(an.bypassed(m)) == sorted(skipped)
    assert "cross_modal_image_layers.1.output.dense.weight" not in m.state_dict()
    assert any(k.startswith("vlcompress_adapters.") for k in m.state_dict())
    assert sum(p.numel() for p in m.parameters()) < params
    with torch.no_grad():
        assert m(b).shape == (3, 7)
