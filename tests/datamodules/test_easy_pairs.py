"""easy-pairs: attributes read from the real easy-VQA questions, balanced statements, batches of
image pairs, and a pair run end to end (task pair, ViLT's two-pass head)."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from vlcompress.config import load_experiment
from vlcompress.data.contract import PAIR_ANSWERS, check_data_contract
from vlcompress.datamodules.easy_pairs import (
    COLORS,
    TEMPLATES,
    EasyPairsDataModule,
    image_attributes,
)
from vlcompress.run import run_experiment


@pytest.fixture(scope="module")
def pairs():
    dm = EasyPairsDataModule(num_train=2000, num_test=400, batch_size=32, seed=3)
    dm.prepare_data()
    dm.setup()
    return dm


def test_attributes_match_the_pixels(pairs):
    rows = json.loads((pairs.root / "train" / "questions.json").read_text())
    attributes = image_attributes(rows)
    assert 0.85 < len(attributes) / len({r[2] for r in rows}) <= 1.0
    images = pairs._images.numpy()
    means = {c: [] for c in COLORS}
    for image, (_, colour) in list(attributes.items())[:600]:
        px = images[image].reshape(-1, 3).astype(int)
        shape_px = px[np.abs(px - px[0]).sum(1) > 60]  # the corner is background
        means[colour].append(shape_px.mean(0))
    red, blue = np.mean(means["red"], 0), np.mean(means["blue"], 0)
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]
    assert np.std(means["gray"], 0).max() < 20  # one colour per name


def test_contradicting_questions_are_refused():
    rows = [["what color is the shape?", "red", 0], ["is there a blue shape?", "yes", 0]]
    with pytest.raises(ValueError, match=r"image 0: its questions name \['blue', 'red'\]"):
        image_attributes(rows)


def test_statements_are_true_as_often_as_false_per_text_and_labels_are_right(pairs):
    assert check_data_contract(pairs) == []
    assert list(pairs.answer_vocab.answers) == list(PAIR_ANSWERS)
    counts = Counter((t, a) for t, a in zip(pairs._texts, pairs._answers))
    assert all(counts[(t, "true")] == counts[(t, "false")] for t, _ in counts)
    assert set(pairs._qtypes) == {t.name for t in TEMPLATES}
    assert pairs.split_report["blind_balanced_baseline"] == 0.5
    assert pairs.split_report["prior_baseline"] == pytest.approx(0.5, abs=0.02)
    # Labels recomputed from the attributes of the two images.
    attrs = {}
    offset = 0
    for part in ("train", "test"):
        rows = json.loads((pairs.root / part / "questions.json").read_text())
        attrs.update({offset + k: v for k, v in image_attributes(rows).items()})
        offset += len({r[2] for r in rows})
    by_name = {t.name: t for t in TEMPLATES}
    for i in range(0, len(pairs._texts), 37):
        left, right = pairs._pairs[i].tolist()
        t = by_name[pairs._qtypes[i]]
        words = pairs._texts[i].split()
        s = next((w for w in words if w in ("circle", "rectangle", "triangle")), "")
        c = next((w for w in words if w in COLORS), "")
        assert t.truth(attrs[left], attrs[right], s, c) == (pairs._answers[i] == "true")


def test_batches_hold_left_and_right_images(pairs):
    batch = next(iter(pairs.train_dataloader()))
    assert batch.visual.shape == (32, 2, 3, 64, 64) and batch.visual.max() <= 1.0
    assert batch.targets.shape == (32, 2) and torch.equal(batch.targets.sum(1), torch.ones(32))
    assert batch.answer_type == ["true/false"] * 32
    again = EasyPairsDataModule(num_train=2000, num_test=400, batch_size=32, seed=3)
    again.setup()
    assert again._texts == pairs._texts and torch.equal(again._pairs, pairs._pairs)
    other = EasyPairsDataModule(num_train=2000, num_test=400, seed=4)
    other.setup()
    assert other._texts != pairs._texts


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match=r"only split: standard"):
        EasyPairsDataModule(split="cp")
    with pytest.raises(ValueError, match=r"visual_features: pixels"):
        EasyPairsDataModule(visual_features="efficientnet_grid")
    with pytest.raises(ValueError, match=r"num_train must be even"):
        EasyPairsDataModule(num_train=201)
    with pytest.raises(ValueError, match=r"exclude_questions does not apply"):
        EasyPairsDataModule(exclude_questions="^what")
    with pytest.raises(ValueError, match=r"balance_answers does not apply"):
        EasyPairsDataModule(balance_answers=True)


def test_a_pair_run_end_to_end_and_single_image_models_are_refused(tmp_path, tiny_run):
    tiny_run = [o for o in tiny_run if not o.startswith("model.")]
    common = [*tiny_run, "data.options.text_encoding=words", "data.options.num_train=400",
              "data.options.num_test=100", "optim.lr_scale={}", "trainer.max_epochs=1"]  # fmt: skip
    cfg, raw = load_experiment(
        "vilt_mini_easy_pairs",
        [
            *common,
            "model.name=vilt_tiny",
            "model.options={head: pair}",
            f"output_dir={tmp_path / 'a'}",
        ],
    )
    results = run_experiment(cfg, raw)
    assert results["test"]["questions"] == 100
    assert results["blind"]["blind_balanced_baseline"] == 0.5
    assert set(results["test"]["question_type"]) == {t.name for t in TEMPLATES}
    cfg, raw = load_experiment(
        "vilt_mini_easy_pairs",
        [*common, "task.name=vqa", "model.name=vilt_tiny", "model.options={head: vqa}",
         f"output_dir={tmp_path / 'b'}"],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"serves image pairs .* reads one image per example"):
        run_experiment(cfg, raw)
