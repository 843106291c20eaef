"""CLIP-ViL: pixels and grid features, the frozen or trainable CLIP ResNet, anatomy, OpenAI's
checkpoint layout (through timm's conversion), slimming and export, training."""

import tempfile
from collections import OrderedDict

import pytest
import torch
from fit_steps import bce_losses
from torch import nn

from vlcompress.compress.slimmable import Slimmable, Submodel, scaled
from vlcompress.data import VLBatch
from vlcompress.encoders.clip_resnet import CLIP_MEAN, CLIP_RESNETS, CLIP_STD, _which_encoder
from vlcompress.models import Modality, anatomy_of, build_model

L, V, X = Modality.LANGUAGE, Modality.VISION, Modality.CROSS
TINY_BLOCKS, TINY_WIDTH = CLIP_RESNETS["tiny"]


def pixel_batch(b=3, t=6, size=64, vocab=50, answers=7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    ids[0, 4:] = 0
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.rand(b, 3, size, size, generator=g),
        targets=torch.rand(b, answers, generator=g).round(),
    )  # fmt: skip


def tiny(**options):
    torch.manual_seed(0)
    return build_model("clip_vil_tiny", 50, 7, **options).eval()


# ---------------------------------------------------------------------- OpenAI's layout
# OpenAI's ModifiedResNet (openai/CLIP clip/model.py), written out here as the reference for the
# published key layout and computation: a 3-conv stem with an average pool, bottlenecks whose
# stride is an average pool before conv3 (and before the 1x1 shortcut), an attention pool.
class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))  # fmt: skip

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + identity)


class AttentionPool2d(nn.Module):  # only its parameters matter here (CLIP-ViL reads the grid)
    def __init__(self, spacial_dim, embed_dim, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim))
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)


class ModifiedResNet(nn.Module):
    def __init__(self, layers, width, output_dim=16, resolution=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(resolution // 32, width * 32, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):  # the grid before the attention pool
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(torch.relu(self.bn3(self.conv3(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class OpenAICLIP(nn.Module):
    """The published file's top level: ``visual`` and (a stand-in for) the text tower."""

    def __init__(self, layers=TINY_BLOCKS, width=TINY_WIDTH):
        super().__init__()
        self.visual = ModifiedResNet(layers, width)
        self.token_embedding = nn.Embedding(10, 8)
        self.positional_embedding = nn.Parameter(torch.randn(5, 8))
        self.ln_final = nn.LayerNorm(8)
        self.text_projection = nn.Parameter(torch.randn(8, 16))
        self.logit_scale = nn.Parameter(torch.ones([]))

    def forward(self, image):
        return self.visual(image)


def openai_clip(layers=TINY_BLOCKS, width=TINY_WIDTH):
    torch.manual_seed(3)
    m = OpenAICLIP(layers, width)
    for mod in m.modules():  # BatchNorms with real statistics and affine parameters
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.normal_(mod.bias, std=0.1)
            mod.running_mean.normal_(std=0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def normalised(pixels):
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict_fp16"])
def test_openai_checkpoint_loads_through_timms_conversion(tmp_path, fmt):
    ref = openai_clip()
    path = tmp_path / "RN50.pt"
    if fmt == "torchscript":  # as published: a TorchScript archive
        torch.jit.save(torch.jit.script(ref), str(path))
    else:
        half = {k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()}
        torch.save(half, path)
    m = tiny(visual_checkpoint=str(path))
    pixels = pixel_batch().visual
    with torch.no_grad():
        expected = ref.visual(normalised(pixels))
    got = m.grid_features(pixels)
    assert got.shape == expected.shape == (3, 32 * TINY_WIDTH, 2, 2)
    if fmt == "torchscript":
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    else:  # the file's half-precision weights, cast to float
        with torch.no_grad():
            expected16 = ref.half().float().visual(normalised(pixels))
        torch.testing.assert_close(got, expected16, rtol=1e-4, atol=1e-4)
    # every tensor of the trunk came from the file (none left at initialisation)
    fresh = tiny()
    assert not torch.equal(fresh.visual.stem.conv1.conv.weight, m.visual.stem.conv1.conv.weight)


def test_openai_checkpoint_errors_name_the_fix(tmp_path):
    path = tmp_path / "RN50.pt"
    with pytest.raises(FileNotFoundError, match="does not exist.*RN50.pt.*visual_checkpoint"):
        tiny(visual_checkpoint=str(path))
    torch.save({"model": {"x": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not an OpenAI CLIP checkpoint"):
        tiny(visual_checkpoint=str(path))
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 32, 32),
                "visual.transformer.resblocks.0.ln_1.weight": torch.zeros(8)}, path)  # fmt: skip
    with pytest.raises(ValueError, match="CLIP ViT image encoder.*RN50.pt"):
        tiny(visual_checkpoint=str(path))
    torch.save(openai_clip(layers=(1, 1, 2, 1)).state_dict(), path)
    with pytest.raises(ValueError, match=r"none registered \(blocks \[1, 1, 2, 1\], width 8\)"):
        tiny(visual_checkpoint=str(path))
    assert _which_encoder(((3, 4, 6, 3), 64)) == "resnet50_clip"
    assert _which_encoder(((4, 6, 10, 6), 80)) == "resnet50x4_clip"
    state = openai_clip().state_dict()
    del state["visual.layer2.0.bn2.running_var"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing \['stages.1.0.conv2_kxk.bn.running_var'\]"):
        tiny(visual_checkpoint=str(path))


@pytest.mark.parametrize("name", ["resnet50_clip", "resnet50x4_clip"])
def test_published_layouts_convert_to_timms_trunk(name):
    """RN50 and RN50x4 as published: every visual.* tensor but the attention pool maps onto
    the timm trunk with its shape (sizes only, on the meta device)."""
    from timm.models.byobnet import checkpoint_filter_fn

    from vlcompress.encoders import build_clip_resnet

    layers, width = CLIP_RESNETS[name]
    with torch.device("meta"):
        ref = ModifiedResNet(layers, width, resolution=224)
        trunk = build_clip_resnet(name)
    published = {f"visual.{k}": v for k, v in ref.state_dict().items()}
    ours = {k: v.shape for k, v in trunk.state_dict().items()}
    converted = {k: v.shape for k, v in checkpoint_filter_fn(published, trunk).items()}
    assert converted == ours
    assert (
        trunk.num_features == 32 * width == {"resnet50_clip": 2048, "resnet50x4_clip": 2560}[name]
    )


# ---------------------------------------------------------------------- the model
def test_pixel_forward_extras_and_precomputed_grids():
    m = tiny()
    b = pixel_batch()
    logits, extras = m(b, return_extras=True)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert extras["pooled"].shape == (3, m.pooled_dim) == (3, 32)
    assert extras["question"].shape == (3, m.question_dim)
    assert m.visual_channels == 256
    # grid features computed beforehand, (B, rows * cols, C) row-major: the same answer
    grid = m.grid_features(b.visual)
    feats = grid.flatten(2).transpose(1, 2)
    torch.testing.assert_close(m(VLBatch(b.text_ids, b.text_mask, feats)), logits)
    # padded question columns change nothing
    padded = VLBatch(
        text_ids=torch.cat([b.text_ids, torch.zeros(3, 3, dtype=torch.long)], 1),
        text_mask=torch.cat([b.text_mask, torch.zeros(3, 3, dtype=torch.bool)], 1),
        visual=b.visual,
    )
    torch.testing.assert_close(m(padded), logits, rtol=1e-5, atol=1e-5)
    # larger images give a larger grid; image_size resizes
    with m.anatomy().capture(m, ["vision_input"]) as seen:
        m(pixel_batch(size=96))
    assert seen["vision_input"].shape == (3, 9, 32)
    resized = tiny(image_size=128)
    with resized.anatomy().capture(resized, ["vision_input"]) as seen:
        resized(b)
    assert seen["vision_input"].shape == (3, 16, 32)


def test_wrong_inputs_and_options_are_explained():
    m = tiny()
    b = pixel_batch()
    with pytest.raises(
        ValueError, match=r"grid features computed beforehand \(B, rows \* cols, 256\)"
    ):
        m(VLBatch(b.text_ids, b.text_mask, torch.randn(3, 5, 256)))
    with pytest.raises(ValueError, match="got \\(3, 4, 16\\)"):
        m(VLBatch(b.text_ids, b.text_mask, torch.randn(3, 4, 16)))
    with pytest.raises(
        ValueError, match="grids up to 8x8, got a 9x9 grid; raise model.options.max_grid"
    ):
        m(pixel_batch(size=288))
    with pytest.raises(ValueError, match="position embeddings for 32 tokens.*of 40"):
        m(pixel_batch(t=40))
    with pytest.raises(ValueError, match="must be divisible by num_heads"):
        build_model("clip_vil_tiny", 50, 7, hidden_size=30)
    with pytest.raises(ValueError, match="raise max_grid to 10"):
        build_model("clip_vil_tiny", 50, 7, image_size=320)
    with pytest.raises(ValueError, match="not a multiple of 32.*use 96"):
        build_model("clip_vil_tiny", 50, 7, image_size=100)
    with pytest.raises(ValueError, match="visual_encoder: 'rn50' is not one of"):
        build_model("clip_vil_tiny", 50, 7, visual_encoder="rn50")


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_or_trainable_visual_encoder(freeze):
    m = tiny(freeze_visual=freeze).train()
    assert not m.visual.training  # BatchNorm statistics stay fixed
    stats = m.visual.stem.conv1.bn.running_mean.clone()
    m(pixel_batch()).sum().backward()
    assert torch.equal(m.visual.stem.conv1.bn.running_mean, stats)
    grads = [p.grad for p in m.visual.parameters()]
    if freeze:
        assert all(not p.requires_grad for p in m.visual.parameters())
        assert all(g is None for g in grads)
    else:
        assert m.visual.stem.conv1.conv.weight.grad.abs().sum() > 0
    assert m.clip_vil.visual_embeddings.visual_linear.weight.grad.abs().sum() > 0


def test_anatomy_validates_covers_everything_and_splits_the_modalities():
    m = tiny()
    an = anatomy_of(m, strict=True)
    an.validate(m)
    assert an.coverage(m).fraction == 1.0
    stack = "clip_vil.encoder.layer"
    assert an.stacks == {stack: [f"{stack}.0", f"{stack}.1"]}
    assert {x.modality for x in an.layers} == {X}
    assert [(a.kind, a.num_heads, a.head_dim) for a in an.attentions] == [("self", 4, 8)] * 2
    assert [f.inner_dim for f in an.ffns] == [64, 64]
    assert an.head_modules == ["task_head"]
    w = an.prunable_weights(m)
    assert set(w[L]) == {"clip_vil.embeddings.word_embeddings.weight"}
    assert {"clip_vil.visual_embeddings.visual_linear.weight", "visual.stem.conv1.conv.weight",
            "visual.stages.3.0.conv3_1x1.conv.weight"} <= set(w[V])  # fmt: skip
    assert not any("position_embeddings" in n for n in w[V])  # 2-D positions: never pruned
    with an.capture(m, ["language_input", "vision_input", "clip_vil.encoder.layer.1"]) as seen:
        m(pixel_batch())
    assert seen["language_input"].shape == (3, 6, 32) and seen["vision_input"].shape == (3, 4, 32)
    assert seen["clip_vil.encoder.layer.1"].shape == (3, 10, 32)


def test_published_sizes():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        m = build_model("clip_vil_rn50", 30522, 3129)
        m4 = build_model("clip_vil_rn50x4", 30522, 3129)
        bert = BertModel(BertConfig())  # bert-base-uncased's sizes
    assert (m.visual_channels, m4.visual_channels) == (2048, 2560)
    body = {k: v.shape for k, v in m.clip_vil.state_dict().items()}
    grid = {k: s for k, s in body.items() if k.startswith("visual_embeddings.")}
    assert {k: s for k, s in body.items() if k not in grid} == {
        k: v.shape for k, v in bert.state_dict().items()
    }
    assert grid["visual_embeddings.visual_linear.weight"] == (768, 2048)
    assert m4.clip_vil.visual_embeddings.visual_linear.weight.shape == (768, 2560)
    assert grid["visual_embeddings.row_position_embeddings.weight"] == (32, 768)
    assert sum(p.numel() for p in m.visual.parameters()) == 23_527_264  # RN50 without attnpool
    assert all(not p.requires_grad for p in m.visual.parameters())  # frozen by default


def test_text_init_loads_a_bert_folder():
    from safetensors.torch import load_file

    from vlcompress.utils.assets import minilm_package_dir

    folder = minilm_package_dir("")
    m = build_model("clip_vil_tiny", 30522, 7, hidden_size=384, num_heads=12, ffn_size=1536,
                    num_layers=6, max_position_embeddings=512, text_init=str(folder))  # fmt: skip
    state = load_file(str(folder / "model.safetensors"))
    body = m.clip_vil.state_dict()
    bert = [k for k in body if k.startswith(("embeddings.", "encoder.layer."))]
    assert len(bert) == 5 + 6 * 16
    for k in bert:
        assert torch.equal(body[k], state[k]), k
    with pytest.raises(ValueError, match=r"num_hidden_layers: checkpoint 6, model 2"):
        build_model("clip_vil_tiny", 30522, 7, hidden_size=384, num_heads=12, ffn_size=1536,
                    max_position_embeddings=512, text_init=str(folder))  # fmt: skip


def test_slims_and_exports_exactly():
    from vlcompress.compress.submodels import load_export, save_export

    m, b = tiny(), pixel_batch()
    ref = m(b)
    slim = Slimmable(m)
    assert torch.equal(m(b), ref)  # width = depth = 1: the original computation, bit for bit
    for sub in (Submodel(0.5, 0.5), Submodel(0.25, 1.0)):
        with slim.submodel(sub):
            out = m(b)
        small = slim.export(sub, b)
        assert small.options.hidden_size == scaled(32, sub.width)
        assert small.options.num_heads == scaled(4, sub.width)
        assert small.options.num_layers == len(small.clip_vil.encoder.layer) == scaled(2, sub.depth)
        rows = small.clip_vil.visual_embeddings.row_position_embeddings.weight
        assert rows.shape == (8, scaled(32, sub.width))
        assert small.visual_channels == 256  # the CLIP ResNet keeps its channels
        torch.testing.assert_close(small(b), out, rtol=0, atol=0)
        with tempfile.TemporaryDirectory() as d:
            save_export(small, d, model_name="clip_vil_tiny",
                        context={"vocab_size": 50, "num_answers": 7}, record={})  # fmt: skip
            torch.testing.assert_close(load_export(d)(b), out, rtol=0, atol=1e-6)
    assert torch.equal(m(b), ref)  # switching back restores the model


def test_tiny_trains_on_real_batches(easy_vqa_dm):
    torch.manual_seed(0)
    m = build_model("clip_vil_tiny", len(easy_vqa_dm.word_vocab), 13, freeze_visual=False)
    losses = bce_losses(m, next(iter(easy_vqa_dm.train_dataloader())))
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


# ---------------------------------------------------------------------- CPU size: clip_vil_mini
def grid_batch(b=2, side=4, channels=1280, t=6, ids=(1000, 2000)):
    """A region batch as easy-VQA's efficientnet_grid serves it: row-major cells with boxes."""
    from vlcompress.data.clip_grid import cell_boxes

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(*ids, (b, t), generator=g)
    ids[0, 4:] = 0
    boxes = torch.from_numpy(cell_boxes(side, side, 1, 1)).expand(b, -1, -1)
    feats = torch.rand(b, side * side, channels, generator=g)
    return VLBatch(text_ids=ids, text_mask=ids != 0, visual=feats, boxes=boxes)


def test_mini_loads_minilm_and_reads_precomputed_grids():
    from safetensors.torch import load_file

    from vlcompress.utils.assets import minilm_package_dir

    torch.manual_seed(0)
    m = build_model("clip_vil_mini", 30522, 13).eval()
    o = m.options
    assert (o.hidden_size, o.num_heads, o.ffn_size, o.num_layers) == (384, 12, 1536, 6)
    assert (o.visual_encoder, o.grid_channels, o.max_grid, o.language_init) == (
        "none", 1280, 6, "minilm")  # fmt: skip
    assert m.visual is None and m.visual_channels == 1280
    state = load_file(str(minilm_package_dir("") / "model.safetensors"))
    body = m.clip_vil.state_dict()
    for k in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        assert torch.equal(body[k], state[k]), k
    b = grid_batch()
    with torch.no_grad():
        logits, extras = m(b, return_extras=True)
        assert logits.shape == (2, 13) and torch.isfinite(logits).all()
        assert extras["pooled"].shape == (2, 384) and extras["question"].shape == (2, 384)
        # the boxes are not read: the cells' row-major order places them
        torch.testing.assert_close(m(VLBatch(b.text_ids, b.text_mask, b.visual)), logits)
        assert m(grid_batch(side=6)).shape == (2, 13)  # a 6x6 grid fits max_grid
    with pytest.raises(ValueError, match="grids up to 6x6, got a 7x7 grid"):
        m(grid_batch(side=7))
    with pytest.raises(ValueError, match="visual_encoder: none has no CNN.*efficientnet_grid"):
        m(pixel_batch(vocab=2000))
    with pytest.raises(ValueError, match=r"\(B, rows \* cols, 1280\).*model.options.grid_channels"):
        m(grid_batch(channels=2048))
    an = anatomy_of(m, strict=True)
    an.validate(m)
    assert an.coverage(m).fraction == 1.0
    assert len(an.layers) == 6 and {x.modality for x in an.layers} == {X}
    assert {(a.num_heads, a.head_dim) for a in an.attentions} == {(12, 32)}
    w = an.prunable_weights(m)
    assert "clip_vil.visual_embeddings.visual_linear.weight" in w[V]
    assert not any(n.startswith("visual.") for n in w[V])  # no CNN
    assert m.slimmed_options(0.5, 3)["language_init"] == "random"


def test_grid_only_options_are_checked():
    with pytest.raises(ValueError, match="visual_encoder: none.*set model.options.grid_channels"):
        build_model("clip_vil_tiny", 50, 7, visual_encoder="none")
    with pytest.raises(ValueError, match="grid_channels 100 differs from the tiny encoder's 256"):
        build_model("clip_vil_tiny", 50, 7, grid_channels=100)
    assert build_model("clip_vil_tiny", 50, 7, grid_channels=256).visual_channels == 256
    with pytest.raises(ValueError, match="visual_checkpoint is given but visual_encoder is none"):
        build_model("clip_vil_tiny", 50, 7, visual_encoder="none", grid_channels=256,
                    visual_checkpoint=__file__)  # fmt: skip
    with pytest.raises(ValueError, match="either text_init .* or language_init='minilm'"):
        build_model("clip_vil_tiny", 50, 7, text_init="/tmp", language_init="minilm")


def test_grid_only_model_slims_and_trains():
    m = tiny(visual_encoder="none", grid_channels=256)
    b = grid_batch(b=3, side=2, channels=256, ids=(1, 50))
    ref = m(b)
    slim = Slimmable(m)
    sub = Submodel(0.5, 0.5)
    with slim.submodel(sub):
        out = m(b)
    small = slim.export(sub, b)
    assert small.visual is None and small.options.hidden_size == 16
    torch.testing.assert_close(small(b), out, rtol=0, atol=0)
    assert torch.equal(m(b), ref)
    m.train()(b).sum().backward()
    assert m.clip_vil.visual_embeddings.visual_linear.weight.grad.abs().sum() > 0
