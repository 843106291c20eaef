"""The decoded-image cache is checked (size + SHA-256 sidecar) and rebuilt when damaged."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

import vlcompress.datamodules.easy_vqa as easy
from vlcompress.datamodules import EasyVQADataModule


@pytest.fixture
def data_dir(tmp_path):
    """A tiny folder in the easy-VQA package's exact layout."""
    root = tmp_path / "data"
    (root / "answers.txt").parent.mkdir(parents=True)
    (root / "answers.txt").write_text("yes\nno\nred\nblue\n")
    rng = np.random.default_rng(0)
    for part, n in (("train", 6), ("test", 3)):
        (root / part / "images").mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / part / "images" / f"{i}.png")
        rows = [["is there a red shape?", "yes" if i % 2 else "no", i] for i in range(n)]
        rows += [["what color is the shape?", "red" if i % 2 else "blue", i] for i in range(n)]
        (root / part / "questions.json").write_text(json.dumps(rows))
    return root


def _dm(data_dir, cache):
    return EasyVQADataModule(data_dir=str(data_dir), cache_dir=str(cache), val_fraction=0.2)


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar"])
def test_a_damaged_cache_is_named_and_rebuilt(data_dir, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    _dm(data_dir, cache).prepare_data()
    (npy,) = cache.glob("easy_vqa/train-images-*.npy")
    good = npy.read_bytes()
    if damage == "truncate":
        npy.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        npy.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    else:
        npy.with_suffix(".json").unlink()
    easy._VERIFIED.clear()  # as in a new process
    dm = _dm(data_dir, cache)
    with caplog.at_level(logging.WARNING, logger="vlcompress.datamodules.easy_vqa"):
        dm.prepare_data()
    assert f"easy-VQA image cache {npy} is unusable" in caplog.text
    assert {"truncate": "truncated?", "flip": "corrupt", "sidecar": "sidecar"}[
        damage
    ] in caplog.text
    assert npy.read_bytes() == good  # rebuilt to the same content
    dm.setup()
    assert len(dm.index["test"]) == 6


def test_efficientnet_grid_features_are_the_encoders_and_cached(data_dir, tmp_path):
    import torch

    from vlcompress.encoders.efficientnet_lite import EfficientNetLite0

    cache = tmp_path / "cache"
    dm = EasyVQADataModule(data_dir=str(data_dir), cache_dir=str(cache), val_fraction=0.2,
                           visual_features="efficientnet_grid", grid_image_size=96)  # fmt: skip
    assert dm.visual_input == "regions"
    dm.prepare_data()
    dm.setup()
    (grid,) = cache.glob("easy_vqa/effnet-lite0-grid96-*.npy")
    stamp = grid.stat().st_mtime_ns
    batch = dm.batch_rows(np.array([0, 1]))
    assert batch.visual.shape == (2, 9, 1280) and batch.boxes.shape == (2, 9, 4)  # 96 px: 3x3
    assert torch.equal(batch.boxes[0, 4], torch.tensor([1 / 3, 1 / 3, 2 / 3, 2 / 3]))
    # the cells are the frozen ImageNet encoder's last feature map of the question's image
    image = dm._images[dm._image_index[0]].permute(2, 0, 1)[None]
    with torch.no_grad():
        ref = EfficientNetLite0(image_size=96, frozen=True).grid(image).flatten(2).transpose(1, 2)
    # stored as float16 (batches of 64 vs 1 may round one float16 step apart)
    torch.testing.assert_close(batch.visual[:1], ref, rtol=2e-3, atol=2e-3)
    again = EasyVQADataModule(data_dir=str(data_dir), cache_dir=str(cache), val_fraction=0.2,
                              visual_features="efficientnet_grid", grid_image_size=96)  # fmt: skip
    again.prepare_data()
    assert grid.stat().st_mtime_ns == stamp  # computed once
    with pytest.raises(ValueError, match="visual_features: 'grid' is not one of"):
        EasyVQADataModule(visual_features="grid")
