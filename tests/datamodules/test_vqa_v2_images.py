"""VQA v2 / VQA-CP v2 with ``visual_features: images``: the COCO images (written as COCO
names them, JPEGs of the fixture images' aspect ratios) resized into the cache and served as
padded pixels with their mask; no region store needed; a ViLT VQA head reads a batch."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from fixtures_vqa import IMAGES, image_name, write_vqa_cp_v2, write_vqa_v2
from PIL import Image

from vlcompress import registry
from vlcompress.data import check_data_contract
from vlcompress.data import images as images_mod
from vlcompress.data.images import ResizeRule, load_rgb
from vlcompress.data.vqa_files import MissingInputsError
from vlcompress.datamodules.vqa_v2 import VQAv2Options
from vlcompress.utils.assets import minilm_package_dir

RULE = ResizeRule(48, 80, 16)


def write_coco_images(folder, scale: int = 8) -> None:
    """``folder/<split>/COCO_<split>_<id>.jpg`` for the fixture images (sides / ``scale``)."""
    rng = np.random.default_rng(0)
    for split, image_id, h, w in IMAGES:
        (folder / split).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (h // scale, w // scale, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / split / f"{image_name(split, image_id)}.jpg")


def make(root, benchmark: str = "vqa_v2", **options):
    opts = dict(data_dir=str(root / "json"), visual_features="images",
                image_dir=str(root / "coco"), cache_dir=str(root / "cache"), shorter=48,
                longer=80, size_divisor=16, min_answer_count=1, batch_size=8,
                eval_batch_size=16) | options  # fmt: skip
    return registry.build("datamodule", benchmark, opts, seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa_images")
    write_vqa_v2(root / "json")
    write_coco_images(root / "coco")
    return root


@pytest.fixture(scope="module")
def v2(root):
    dm = make(root, text_encoding="wordpiece", tokenizer=str(minilm_package_dir("")),
              max_question_len=40)  # fmt: skip
    dm.prepare_data()
    dm.setup()
    return dm


def test_images_need_no_region_store(v2, root):
    assert check_data_contract(v2) == []
    assert not (root / "json" / "regions_obj36").exists()
    assert v2.missing_inputs(v2.options) == []
    info = v2.info()
    assert info.visual_input == "pixels" and info.text_encoding == "wordpiece"
    assert len(v2.index["test"]) == 10 and v2.split_report["visual_features"] == "images"
    assert v2.split_report["resize"] == "s48-l80-d16"


def test_batches_are_padded_resized_coco_images(v2, root):
    batch = next(iter(v2.test_dataloader()))
    assert batch.visual.shape[:2] == (10, 3) and batch.visual.dim() == 4
    assert batch.visual_mask.shape == (10, *batch.visual.shape[-2:]) and batch.boxes is None
    sizes = set()
    for i, qid in enumerate(batch.question_id.tolist()):
        expected = load_rgb(root / "coco" / "val2014" / f"{image_name('val2014', qid // 1000)}.jpg",
                            RULE)  # fmt: skip
        _, h, w = expected.shape
        sizes.add((h, w))
        assert batch.visual_mask[i, :h, :w].all() and batch.visual_mask[i].sum() == h * w
        got = (batch.visual[i, :, :h, :w] * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(got, expected)
    assert sizes == {(48, 64), (64, 48)}  # val2014: a portrait and a landscape image


def test_a_vilt_vqa_head_reads_a_batch(v2):
    from vlcompress.models import build_model

    torch.manual_seed(0)
    batch = next(iter(v2.train_dataloader()))
    model = build_model("vilt_tiny", v2.vocab_size(), len(v2.answer_vocab), image_size=64).eval()
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (len(batch), len(v2.answer_vocab)) and torch.isfinite(logits).all()


def test_the_cache_is_reused_and_a_truncated_shard_rebuilt(v2, root, monkeypatch, caplog):
    expected = v2.batch_rows(np.arange(6)).visual

    def no_decoding(*a, **k):
        raise AssertionError("images were resized again")

    with monkeypatch.context() as m:
        m.setattr(images_mod, "load_rgb", no_decoding)
        again = make(root)
        again.prepare_data()
        again.setup()
        assert torch.equal(again.batch_rows(np.arange(6)).visual, expected)
    shard = next(v2.image_cache.folder.glob("shard-*.u8"))
    shard.write_bytes(shard.read_bytes()[:100])
    fresh = make(root)
    with caplog.at_level(logging.WARNING, logger="vlcompress.data.images"):
        fresh.setup()
    assert "truncated?" in caplog.text
    assert torch.equal(fresh.batch_rows(np.arange(6)).visual, expected)


def test_vqa_cp_v2_reads_the_images_of_both_coco_splits(root):
    write_vqa_cp_v2(root / "cp")
    dm = make(root, "vqa_cp_v2", data_dir=str(root / "cp"))
    dm.setup()
    assert check_data_contract(dm) == [] and dm.info().visual_input == "pixels"
    splits = {s for s in np.asarray([f.split("/")[0] for f in dm.image_files(_part(dm))])}
    assert splits == {"train2014", "val2014"}
    assert next(iter(dm.train_dataloader())).visual.dim() == 4


def test_vqa_v2_and_vqa_cp_v2_extend_their_shared_cache(tmp_path, monkeypatch):
    """The two benchmarks read one COCO folder with one rule, so they share a cache folder and
    add the images in other orders; one opened it before the other built it: neither's
    pixels are replaced under it and nothing is resized twice."""
    write_vqa_v2(tmp_path / "json")
    write_vqa_cp_v2(tmp_path / "cp")
    write_coco_images(tmp_path / "coco")
    v2 = make(tmp_path)
    cp = make(tmp_path, "vqa_cp_v2", data_dir=str(tmp_path / "cp"))
    assert v2.image_cache.folder == cp.image_cache.folder
    assert len(v2.image_cache) == 0  # vqa_v2 opened the cache before vqa_cp_v2 built it
    cp.prepare_data()
    cp.setup()
    built = json.loads(cp.image_cache.manifest_path.read_text())["shards"]
    with monkeypatch.context() as m:
        m.setattr(images_mod, "load_rgb", _no_decoding)  # vqa_cp_v2 built every image
        v2.prepare_data()
        v2.setup()
    assert json.loads(v2.image_cache.manifest_path.read_text())["shards"] == built
    for dm, benchmark, data in ((v2, "vqa_v2", "json"), (cp, "vqa_cp_v2", "cp")):
        ref = make(tmp_path, benchmark, data_dir=str(tmp_path / data),
                   cache_dir=str(tmp_path / "alone"))  # fmt: skip
        ref.setup()
        rows = np.arange(len(dm._question_ids))
        assert torch.equal(dm.batch_rows(rows).visual, ref.batch_rows(rows).visual), benchmark


def _no_decoding(*a, **k):
    raise AssertionError("images were resized again")


def test_the_image_cache_checks_sizes_by_default():
    assert VQAv2Options().image_cache_verify == "size"


def _part(dm):
    from vlcompress.data.vqa_files import VQAPart

    part = VQAPart()
    for _, p in dm._load_parts():
        part.coco_split.extend(p.coco_split)
        part.image_id.extend(p.image_id)
    return part


def test_a_missing_image_is_named_or_dropped(tmp_path):
    write_vqa_v2(tmp_path / "json")
    write_coco_images(tmp_path / "coco")
    path = tmp_path / "coco" / "val2014" / f"{image_name('val2014', 73)}.jpg"
    path.unlink()
    with pytest.raises(FileNotFoundError) as e:
        make(tmp_path).prepare_data()  # before resizing anything
    assert not (tmp_path / "cache").exists()
    with pytest.raises(FileNotFoundError) as e:
        make(tmp_path).setup()
    message = str(e.value)
    assert "5 question(s) refer to 1 image(s) missing in data.options.image_dir" in message
    assert f"needs {str(path)!r}" in message and "cocodataset.org" in message
    assert "drop_missing_images" in message
    dm = make(tmp_path, drop_missing_images=True)
    dm.setup()
    assert len(dm.index["test"]) == 5 and dm.split_report["dropped_questions_missing_images"] == 5


def test_missing_image_folders_are_listed(tmp_path):
    write_vqa_v2(tmp_path / "json")
    (tmp_path / "coco" / "train2014").mkdir(parents=True)
    dm = make(tmp_path)
    (problem,) = dm.missing_inputs(dm.options)
    assert problem.startswith("data.options.image_dir (visual_features: images)")
    assert "lacks val2014/" in problem and "cocodataset.org" in problem
    with pytest.raises(MissingInputsError, match="lacks val2014/"):
        dm.setup()
    unset = make(tmp_path, image_dir=None)
    assert (
        "image_dir (visual_features: images) is not set" in unset.missing_inputs(unset.options)[0]
    )
    with pytest.raises(ValueError, match="visual_features: 'pixels' is not one of"):
        make(tmp_path, visual_features="pixels")
