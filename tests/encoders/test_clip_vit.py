"""CLIP's ViT image tower on a tiny checkpoint in OpenAI's exact key layout: sizes read from
the shapes (the real ViT-B/32 and ViT-L/14 shapes too), a strict load, numerics checked against
``transformers``' own ``CLIPVisionModelWithProjection`` at the trained size and at larger and
rectangular inputs (interpolated positions), the errors of a wrong file or tensor, frozen
teachers and ``build_encoder``."""

from __future__ import annotations

import pytest
import torch

from vlcompress.encoders.clip_resnet import clip_input
from vlcompress.encoders.clip_vit import (
    CLIPVisionTransformer,
    CLIPViTFeatures,
    clip_vit_config,
    load_openai_clip_vit,
)

PATCH, GRID, WIDTH, LAYERS, EMBED = 8, 4, 128, 2, 48  # width 128: 2 heads, as OpenAI's
IMAGE = PATCH * GRID


def _openai_vit_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny CLIP ViT checkpoint in OpenAI's exact layout: the ``visual.*`` tensors, a text
    tensor and ``logit_scale`` (ignored), half-precision blocks as OpenAI's files have."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    state = {
        "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH),
        "visual.class_embedding": r(WIDTH),
        "visual.positional_embedding": r(GRID * GRID + 1, WIDTH),
        "visual.ln_pre.weight": 1 + r(WIDTH),
        "visual.ln_pre.bias": r(WIDTH),
        "visual.ln_post.weight": 1 + r(WIDTH),
        "visual.ln_post.bias": r(WIDTH),
        "visual.proj": r(WIDTH, EMBED),
        "token_embedding.weight": r(10, 16),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(LAYERS):
        p = f"visual.transformer.resblocks.{i}."
        state |= {
            p + "ln_1.weight": 1 + r(WIDTH),
            p + "ln_1.bias": r(WIDTH),
            p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH),
            p + "attn.in_proj_bias": r(3 * WIDTH),
            p + "attn.out_proj.weight": r(WIDTH, WIDTH),
            p + "attn.out_proj.bias": r(WIDTH),
            p + "ln_2.weight": 1 + r(WIDTH),
            p + "ln_2.bias": r(WIDTH),
            p + "mlp.c_fc.weight": r(4 * WIDTH, WIDTH),
            p + "mlp.c_fc.bias": r(4 * WIDTH),
            p + "mlp.c_proj.weight": r(WIDTH, 4 * WIDTH),
            p + "mlp.c_proj.bias": r(WIDTH),
        }
    return {k: v.half() if ".resblocks." in k else v for k, v in state.items()}


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return _openai_vit_state()


@pytest.fixture(scope="module")
def hf_vit(state):
    """``transformers``' CLIPVisionModelWithProjection with the OpenAI tensors: an independent
    implementation of the same forward (class token, ``pre_layrnorm``, QuickGELU blocks,
    ``post_layernorm`` of the class token, ``visual_projection``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=WIDTH // 64, image_size=IMAGE, patch_size=PATCH,
        projection_dim=EMBED, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )  # fmt: skip
    s = {k.removeprefix("visual."): v.float() for k, v in state.items()}
    v = "vision_model."
    hf = {
        v + "embeddings.patch_embedding.weight": s["conv1.weight"],
        v + "embeddings.class_embedding": s["class_embedding"],
        v + "embeddings.position_embedding.weight": s["positional_embedding"],
        v + "pre_layrnorm.weight": s["ln_pre.weight"],
        v + "pre_layrnorm.bias": s["ln_pre.bias"],
        v + "post_layernorm.weight": s["ln_post.weight"],
        v + "post_layernorm.bias": s["ln_post.bias"],
        "visual_projection.weight": s["proj"].T,
    }
    for i in range(LAYERS):
        p, q = f"transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for name, w, b in zip("qkv", s[p + "attn.in_proj_weight"].chunk(3),
                              s[p + "attn.in_proj_bias"].chunk(3)):  # fmt: skip
            hf[q + f"self_attn.{name}_proj.weight"], hf[q + f"self_attn.{name}_proj.bias"] = w, b
        for ours, theirs in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"),
                             ("mlp.c_proj", "mlp.fc2")]:  # fmt: skip
            for t in ("weight", "bias"):
                hf[q + f"{theirs}.{t}"] = s[p + f"{ours}.{t}"]
    model = CLIPVisionModelWithProjection(config).eval()
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return model


@pytest.fixture(scope="module")
def vit(state, tmp_path_factory) -> CLIPVisionTransformer:
    file = tmp_path_factory.mktemp("clip") / "tiny_vit.pt"
    torch.save(state, file)
    return load_openai_clip_vit(file)


def _images(batch: int, height: int, width: int, seed: int = 1) -> torch.Tensor:
    """CLIP-normalised images from pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return clip_input(torch.rand(batch, 3, height, width, generator=g))


def _expected(hf_vit, images, interpolate: bool = False) -> CLIPViTFeatures:
    """The grid and pooled features by ``transformers``: ``post_layernorm`` of the patch tokens
    laid on the grid, and ``image_embeds``."""
    out = hf_vit(pixel_values=images, interpolate_pos_encoding=interpolate)
    patches = hf_vit.vision_model.post_layernorm(out.last_hidden_state[:, 1:])
    rows, cols = images.shape[-2] // PATCH, images.shape[-1] // PATCH
    grid = patches.transpose(1, 2).reshape(images.shape[0], WIDTH, rows, cols)
    return CLIPViTFeatures(grid, out.image_embeds)


def _assert_features(ours: CLIPViTFeatures, theirs: CLIPViTFeatures) -> None:
    assert ours.grid.shape == theirs.grid.shape and ours.pooled.shape == theirs.pooled.shape
    torch.testing.assert_close(ours.pooled, theirs.pooled, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.grid, theirs.grid, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- load and numerics
def test_clip_vit_from_an_openai_layout_checkpoint_matches_transformers(state, vit, hf_vit):
    assert clip_vit_config(state) == dict(image_size=IMAGE, patch_size=PATCH, width=WIDTH,
                                          layers=LAYERS, heads=2, embed_dim=EMBED)  # fmt: skip
    sizes = (vit.image_size, vit.patch_size, vit.width, vit.embed_dim)
    assert sizes == (IMAGE, PATCH, WIDTH, EMBED) and len(vit.transformer.resblocks) == LAYERS
    assert vit.transformer.resblocks[0].attn.num_heads == 2
    assert not vit.training and all(p.dtype == torch.float32 for p in vit.parameters())
    # every visual.* tensor of the file is in the model, under its own name, unchanged
    ours = vit.state_dict()
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    assert set(ours) == set(visual)
    for k, v in visual.items():
        torch.testing.assert_close(ours[k], v.float(), rtol=0, atol=0)
    images = _images(3, IMAGE, IMAGE)
    with torch.no_grad():
        out = vit(images)
        _assert_features(out, _expected(hf_vit, images))
        # the grid cell (i, j) is the patch at row i, column j: the tokens in row-major order
        tokens = vit.tokens(images)
        torch.testing.assert_close(out.grid[:, :, 1, 2], tokens[:, 1 + 1 * GRID + 2])
        torch.testing.assert_close(out.pooled, tokens[:, 0] @ vit.proj)
        # encode: pixels in [0, 1], resized and normalised by clip_input
        pixels = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(vit.encode(pixels, IMAGE).pooled,
                                   vit(clip_input(pixels, IMAGE)).pooled)  # fmt: skip


def test_real_openai_vit_shapes_are_inferred():
    """ViT-B/32 and ViT-L/14 as OpenAI's files have them (empty tensors on the meta device)."""

    def shaped(width, patch, grid, layers, embed):
        def e(*shape):
            return torch.empty(*shape, device="meta")

        state = {
            "visual.conv1.weight": e(width, 3, patch, patch),
            "visual.class_embedding": e(width),
            "visual.positional_embedding": e(grid * grid + 1, width),
            "visual.ln_post.weight": e(width),
            "visual.proj": e(width, embed),
        }
        for i in range(layers):
            state[f"visual.transformer.resblocks.{i}.ln_1.weight"] = e(width)
        return state

    assert clip_vit_config(shaped(768, 32, 7, 12, 512)) == dict(
        image_size=224, patch_size=32, width=768, layers=12, heads=12, embed_dim=512
    )
    assert clip_vit_config(shaped(1024, 14, 24, 24, 768)) == dict(
        image_size=336, patch_size=14, width=1024, layers=24, heads=16, embed_dim=768
    )


def test_larger_and_rectangular_inputs_use_interpolated_positions(vit, hf_vit):
    with torch.no_grad():
        for height, width in [(2 * IMAGE, 2 * IMAGE), (IMAGE, IMAGE + 2 * PATCH)]:
            images = _images(2, height, width, seed=height + width)
            out = vit(images)
            assert out.grid.shape == (2, WIDTH, height // PATCH, width // PATCH)
            _assert_features(out, _expected(hf_vit, images, interpolate=True))
        positions = vit.positions(2 * GRID, 2 * GRID)
    assert positions.shape == (1 + 4 * GRID * GRID, WIDTH)
    torch.testing.assert_close(positions[0], vit.positional_embedding[0], rtol=0, atol=0)
    assert vit.positions(GRID, GRID) is vit.positional_embedding  # trained size: as learned
    with pytest.raises(ValueError, match=r"smaller than one patch \(8\)"):
        vit(torch.zeros(1, 3, 4, 32))


# ---------------------------------------------------------------------- errors
def test_clip_vit_strict_load_errors(state, tmp_path):
    broken = dict(state)
    del broken["visual.transformer.resblocks.1.ln_2.weight"]
    broken["visual.transformer.resblocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_openai_clip_vit(state=broken)
    assert "missing ['visual.transformer.resblocks.1.ln_2.weight']" in str(e.value)
    assert "unexpected ['visual.transformer.resblocks.0.attn.extra']" in str(e.value)
    assert "Pass an unmodified OpenAI ViT checkpoint" in str(e.value)

    broken = state | {"visual.transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=r"c_fc\.weight: checkpoint \(3, 3\), model \(512, 128\)"):
        load_openai_clip_vit(state=broken)

    broken = {k: v for k, v in state.items() if k != "visual.proj"}
    torch.save(broken, tmp_path / "no_proj.pt")
    with pytest.raises(ValueError, match=r"no_proj\.pt.*no \['visual\.proj'\]"):
        load_openai_clip_vit(tmp_path / "no_proj.pt")

    resnet = {"visual.conv1.weight": torch.zeros(4, 3, 3, 3),
              "visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}  # fmt: skip
    with pytest.raises(ValueError, match=r"CLIP ResNet.*load_openai_clip_visual"):
        load_openai_clip_vit(state=resnet)

    broken = state | {"visual.positional_embedding": torch.zeros(GRID * GRID, WIDTH)}
    with pytest.raises(ValueError, match="16 rows; expected a square patch grid plus the class"):
        load_openai_clip_vit(state=broken)

    with pytest.raises(FileNotFoundError, match=r"missing\.pt' does not exist"):
        load_openai_clip_vit(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="pass the path of an OpenAI CLIP ViT checkpoint"):
        load_openai_clip_vit()
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
        CLIPVisionTransformer(image_size=30, patch_size=8)


# ---------------------------------------------------------------------- frozen, by name
def test_build_encoder_clip_vit_frozen(state, tmp_path):
    from vlcompress.encoders import ENCODERS, build_encoder

    assert "clip_vit" in ENCODERS
    torch.save(state, tmp_path / "tiny_vit.pt")
    vit = build_encoder("clip_vit", tmp_path / "tiny_vit.pt", frozen=True)
    vit.train()
    assert isinstance(vit, CLIPVisionTransformer) and not vit.training
    assert not any(m.training for m in vit.modules())
    assert not any(p.requires_grad for p in vit.parameters())
    images = _images(1, IMAGE, IMAGE).requires_grad_(True)
    vit(images).pooled.sum().backward()  # gradients reach the input, not the weights
    assert images.grad is not None and all(p.grad is None for p in vit.parameters())
    trainable = build_encoder("clip_vit", tmp_path / "tiny_vit.pt")
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    with pytest.raises(ValueError, match="clip_vit needs the path of an OpenAI CLIP ViT"):
        build_encoder("clip_vit")
