"""NLVR2 on fixtures in its published format (JSON lines with every published field, images in
ViLT's layout, one JPEG behind a .png name): splits, question types, padded pairs with their
masks, the cache, every error naming file and line, and a ViLT pair head on a batch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_nlvr2 import example, make, many_sets, write_nlvr2

from vlcompress.data import check_data_contract
from vlcompress.data import images as images_mod
from vlcompress.data.images import ResizeRule, load_rgb
from vlcompress.data.vqa_files import MissingInputsError
from vlcompress.datamodules.nlvr2 import NLVR2Options, question_type


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2")
    rows = write_nlvr2(root)
    dm = make(root, root / "cache")
    dm.prepare_data()
    dm.setup()
    return root, rows, dm


def test_splits_types_answers_and_contract(fixture):
    root, rows, dm = fixture
    assert check_data_contract(dm) == []
    info = dm.info()
    assert info.visual_input == "pixel_pairs" and info.text_encoding == "wordpiece"
    assert info.answers == ["false", "true"] and info.answer_types == ["true/false"]
    assert info.vocab_size == 30522
    sizes = {p: len(dm.index[p]) for p in ("train", "val", "test")}
    assert sizes == {"train": len(rows["train"]), "val": len(rows["dev"]),
                     "test": len(rows["test1"])}  # fmt: skip
    assert [dm.identifiers[i] for i in dm.index["val"]] == [r["identifier"] for r in rows["dev"]]
    assert dm.question_id_strings(torch.as_tensor(dm.index["test"])) == [
        r["identifier"] for r in rows["test1"]
    ]
    # question types: first two words; prefixes with < 2 training statements are "other"
    train_prefixes = [question_type(r["sentence"]) for r in rows["train"]]
    kept = sorted({p for p in train_prefixes if train_prefixes.count(p) >= 2})
    assert dm.question_types[:-1] == kept and dm.question_types[-1] == "other"
    assert question_type("There are two dogs.") == "there are"
    for i, r in enumerate(rows["train"] + rows["dev"] + rows["test1"]):
        prefix = question_type(r["sentence"])
        assert dm._qtypes[i] == (prefix if prefix in kept else "other")
        assert dm._answers[i] == r["label"].lower()
    prior = dm.question_type_prior()
    assert prior.shape == (len(dm.question_types), 2) and torch.allclose(
        prior.sum(1), torch.ones(len(dm.question_types))
    )
    report = dm.split_report
    assert report["benchmark"] == "nlvr2" and report["dropped_examples_missing_images"] == 0
    assert "per_type" in report or "mean_tv_distance" in report


def test_batches_hold_padded_pairs_with_their_masks(fixture):
    root, rows, dm = fixture
    rule = ResizeRule(32, 64, 16)
    batch = next(iter(dm.val_dataloader()))
    n = len(rows["dev"])
    assert batch.visual.dim() == 5 and batch.visual.shape[:3] == (n, 2, 3)
    assert batch.visual_mask.shape == (n, 2, *batch.visual.shape[-2:])
    assert (
        batch.visual.dtype == torch.float32 and 0 <= batch.visual.min() and batch.visual.max() <= 1
    )
    assert batch.text_ids.shape == (n, 40) and (batch.text_ids[:, 0] == 101).all()
    assert (batch.text_mask == (batch.text_ids != 0)).all()
    assert batch.targets.shape == (n, 2) and batch.answer_type == ["true/false"] * n
    sizes = set()
    for i, row in enumerate(batch.question_id.tolist()):
        ident = dm.identifiers[row]
        r = next(r for r in rows["dev"] if r["identifier"] == ident)
        assert batch.targets[i].tolist() == ([0.0, 1.0] if r["label"] == "True" else [1.0, 0.0])
        assert batch.answers[i][0] == r["label"].lower()
        stem = ident.rsplit("-", 1)[0]
        for side in (0, 1):
            expected = load_rgb(root / "images" / "dev" / f"{stem}-img{side}.png", rule)
            _, h, w = expected.shape
            sizes.add((h, w))
            mask = batch.visual_mask[i, side]
            assert mask[:h, :w].all() and mask.sum() == h * w  # True on real pixels only
            got = (batch.visual[i, side, :, :h, :w] * 255).round().to(torch.uint8)
            np.testing.assert_array_equal(got.numpy(), expected)
            assert batch.visual[i, side][:, ~mask].eq(0).all()
    assert len(sizes) > 1  # the pairs differ in size: padding was needed


def test_a_vilt_pair_head_reads_a_training_batch(fixture):
    from vlcompress.models import build_model

    _, _, dm = fixture
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    model = build_model("vilt_tiny", dm.vocab_size(), 2, head="pair", image_size=64).eval()
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == (len(batch), 2) and torch.isfinite(logits).all()


def test_the_cache_is_reused_and_a_damaged_one_rebuilt(fixture, tmp_path, monkeypatch, caplog):
    root, rows, dm = fixture
    expected = dm.batch_rows(np.arange(4))

    def no_decoding(*a, **k):
        raise AssertionError("images were resized again")

    with monkeypatch.context() as m:
        m.setattr(images_mod, "load_rgb", no_decoding)
        again = make(root, root / "cache")
        again.prepare_data()
        again.setup()
        assert torch.equal(again.batch_rows(np.arange(4)).visual, expected.visual)
    shard = next(dm.cache.folder.glob("shard-*.u8"))
    shard.write_bytes(shard.read_bytes()[:-10])
    fresh = make(root, root / "cache")
    with caplog.at_level(logging.WARNING, logger="vlcompress.data.images"):
        fresh.setup()
    assert "truncated?" in caplog.text
    assert torch.equal(fresh.batch_rows(np.arange(4)).visual, expected.visual)


def test_train_images_directly_under_train_and_words_and_cp(tmp_path):
    rows = write_nlvr2(tmp_path, train_folder="train")
    assert (
        make(tmp_path, tmp_path / "c").missing_inputs(make(tmp_path, tmp_path / "c").options) == []
    )
    dm = make(tmp_path, tmp_path / "c", text_encoding="words", split="cp", val_fraction=0.2)
    dm.setup()
    n = sum(len(v) for v in rows.values())
    assert sorted(np.concatenate([dm.index[p] for p in ("train", "val", "test")]).tolist()) == list(
        range(n)
    )
    assert (
        dm.info().text_encoding == "words" and next(iter(dm.train_dataloader())).visual.dim() == 5
    )


def test_cp_keeps_each_image_set_in_one_part(tmp_path):
    """NLVR2's README: a new split must not put one image set in two parts (the same
    photographs in train and test). ``split: cp`` re-splits by whole sets."""
    rows = write_nlvr2(tmp_path, pairs=many_sets(12))
    idents = [r["identifier"] for part in rows.values() for r in part]
    for seed in (0, 1, 2):
        dm = make(tmp_path, tmp_path / "c", split="cp", val_fraction=0.2)
        dm.seed = seed
        dm.setup()
        part_of_set: dict[str, set[str]] = {}
        for part in ("train", "val", "test"):
            assert len(dm.index[part]) > 0
            for i in dm.index[part]:
                part_of_set.setdefault("-".join(dm.identifiers[i].split("-")[:2]), set()).add(part)
        straddling = {s: p for s, p in part_of_set.items() if len(p) > 1}
        assert not straddling, f"seed {seed}: image sets in several parts: {straddling}"
        assert len(part_of_set) == 36  # train-3 and dev-3 are different sets
        assert sorted(np.concatenate(list(dm.index.values())).tolist()) == list(range(len(idents)))
        assert dm.split_report["split_unit"] == "image set"
        assert 0.25 < len(dm.index["test"]) / len(idents) < 0.75  # ~half, as per statement


def test_the_image_cache_checks_sizes_by_default():
    assert NLVR2Options().image_cache_verify == "size"
    assert NLVR2Options(image_cache_verify="checksum").image_cache_verify == "checksum"


# ---------------------------------------------------------------------------------- errors
@pytest.fixture
def written(tmp_path):
    return tmp_path, write_nlvr2(tmp_path)


def _error(root: Path, exc: type = ValueError, **options) -> str:
    with pytest.raises(exc) as e:
        make(root, root / "cache", **options).setup()
    return str(e.value)


def _rewrite_line(path: Path, lineno: int, text: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[lineno - 1] = text
    path.write_text("".join(lines))


def test_a_missing_image_names_file_line_and_path(written):
    root, rows = written
    stem = rows["dev"][2]["identifier"].rsplit("-", 1)[0]  # its own pair (line 3)
    (root / "images" / "dev" / f"{stem}-img1.png").unlink()
    message = _error(root, FileNotFoundError)
    assert f"{root / 'data' / 'dev.json'}:3: example {rows['dev'][2]['identifier']!r}" in message
    assert f"right image '{root / 'images' / 'dev' / stem}-img1.png' does not exist" in message
    assert "drop_missing_images" in message
    assert not (root / "cache").exists()  # stopped before resizing anything
    dm = make(root, root / "cache", drop_missing_images=True)
    dm.setup()
    lost = sum(r["identifier"].startswith(stem) for r in rows["dev"])
    assert len(dm.index["val"]) == len(rows["dev"]) - lost
    assert dm.split_report["dropped_examples_missing_images"] == lost


def test_a_missing_train_image_names_its_directory(written):
    root, rows = written
    r = rows["train"][3]
    stem = r["identifier"].rsplit("-", 1)[0]
    path = root / "images" / "images" / "train" / str(r["directory"]) / f"{stem}-img0.png"
    path.unlink()
    message = _error(root, FileNotFoundError)
    assert f"train.json:4: example {r['identifier']!r}: its left image {str(path)!r}" in message


def test_a_bad_label_names_file_and_line(written):
    root, rows = written
    bad = example("train", rows["train"][2]["identifier"], "There are dogs.", True, 3)
    bad["label"] = "true"
    _rewrite_line(root / "data" / "train.json", 3, json.dumps(bad) + "\n")
    message = _error(root)
    assert f"{root / 'data' / 'train.json'}:3: label 'true'" in message
    assert "is not 'True' or 'False'" in message


def test_a_truncated_or_non_json_line_names_file_and_line(written):
    root, rows = written
    path = root / "data" / "test1.json"
    text = path.read_text()
    path.write_text(text[: len(text) - 30])  # cut in the middle of the last line
    n = len(rows["test1"])
    message = _error(root)
    assert f"{path}:{n}: not a JSON line" in message and "truncated or damaged" in message
    path.write_text(text)
    _rewrite_line(root / "data" / "dev.json", 2, "[1, 2]\n")
    assert "dev.json:2: expected one JSON object per line" in _error(root)


def test_other_malformed_lines_name_file_and_line(written):
    root, rows = written
    row = dict(rows["dev"][0])
    del row["sentence"]
    _rewrite_line(root / "data" / "dev.json", 1, json.dumps(row) + "\n")
    assert "dev.json:1: lacks ['sentence']" in _error(root)
    row = dict(rows["train"][0])
    del row["directory"]
    _rewrite_line(root / "data" / "train.json", 1, json.dumps(row) + "\n")
    assert "train.json:1: lacks ['directory']" in _error(root)
    _rewrite_line(
        root / "data" / "train.json", 1, json.dumps(rows["dev"][0] | {"directory": 3}) + "\n"
    )
    assert "train.json:1: identifier 'dev-850-0-0' is not train-<set>-<pair>-<sentence>" in _error(
        root
    )
    _rewrite_line(root / "data" / "train.json", 1, json.dumps(rows["train"][1]) + "\n")
    assert f"train.json:2: identifier {rows['train'][1]['identifier']!r} repeats line 1" in _error(
        root
    )


def test_missing_files_say_what_to_download_and_where(written):
    root, _ = written
    (root / "data" / "dev.json").unlink()
    message = _error(root, MissingInputsError)
    assert "data.options.data_dir" in message and "lacks dev.json" in message
    assert "https://github.com/lil-lab/nlvr" in message and "nlvr2/data" in message
    dm = make(root, root / "cache", image_dir=str(root / "nowhere"))
    problems = dm.missing_inputs(dm.options)
    assert len(problems) == 2 and "data.options.image_dir" in problems[1]
    assert "does not exist" in problems[1] and "images/train/" in problems[1]
    unset = make(root, root / "cache", image_dir=None)
    assert any(
        "data.options.image_dir is not set" in p for p in unset.missing_inputs(unset.options)
    )
    (root / "images" / "test1").rename(root / "images" / "test")
    assert (
        "lacks test1/"
        in make(root, root / "cache").missing_inputs(make(root, root / "cache").options)[1]
    )
