"""easy-VQA data module on the real data: sizes, batches, targets, the VQA-CP-style split."""

import numpy as np
import pytest
import torch

from vlcompress.data import EpochShuffleSampler, VLBatch, total_variation
from vlcompress.datamodules import EasyVQADataModule
from vlcompress.datamodules.easy_vqa import question_type


def test_standard_split_sizes_and_disjointness(easy_vqa_dm):
    idx = easy_vqa_dm.index
    # 38,575 train questions of the package (val carved out, 10%) and its 9,673 test questions.
    assert len(idx["train"]) + len(idx["val"]) == 38575
    assert len(idx["val"]) == round(0.1 * 38575)
    assert len(idx["test"]) == 9673
    assert not set(idx["train"]) & set(idx["val"])
    assert len(easy_vqa_dm.answer_vocab) == 13


def test_batch_contents(easy_vqa_batch, easy_vqa_dm):
    b = easy_vqa_batch
    assert isinstance(b, VLBatch) and len(b) == 16
    assert b.visual.shape == (16, 3, 64, 64) and b.visual.dtype == torch.float32
    assert 0.0 <= float(b.visual.min()) and float(b.visual.max()) <= 1.0
    assert b.text_mask.dtype == torch.bool and torch.equal(b.text_mask, b.text_ids != 0)
    # One annotator answer repeated -> soft score 1.0 on exactly that answer.
    assert torch.equal(b.targets.sum(1), torch.ones(16))
    decoded = easy_vqa_dm.answer_vocab.decode(b.targets)
    assert decoded == [a[0] for a in b.answers]
    assert all(len(a) == 10 for a in b.answers)
    assert set(b.answer_type) <= {"yes/no", "other"}


def test_question_type_is_leading_words_without_answer_words():
    content = frozenset({"red", "circle", "no", "yes"})
    assert question_type("What color is the circle?", content) == "what color is"
    assert question_type("is a red shape present?", content) == "is a"
    assert question_type("is there a circle?", content) == "is there a"


@pytest.fixture(scope="module")
def cp_dm():
    dm = EasyVQADataModule(split="cp", seed=0)
    dm.setup()
    return dm


def test_cp_split_shifts_priors(cp_dm, easy_vqa_dm):
    cp, std = cp_dm.split_report, easy_vqa_dm.split_report
    assert std["mean_tv_distance"] < 0.1  # the package split keeps priors
    assert cp["mean_tv_distance"] > 0.7  # the cp split reverses them per question type
    for qt, rep in cp["per_question_type"].items():  # ... yet every type keeps its answers in train
        assert set(rep["test"]) <= set(rep["train"]), qt
    total = sum(cp["sizes"].values())
    assert total == 38575 + 9673  # all questions pooled, none lost
    # the blind baselines: answering the train prior fails on the cp split, not on the standard
    # one; answering against it is the shortcut a debiasing loss can take
    assert std["prior_baseline"] > 0.3 > cp["prior_baseline"]
    assert cp["anti_prior_baseline"] > 0.5 > std["anti_prior_baseline"]
    yes_no = cp["per_question_type"]["does the image"]
    assert {yes_no["prior_answer"], yes_no["anti_prior_answer"]} == {"yes", "no"}
    assert yes_no["prior_baseline"] + yes_no["anti_prior_baseline"] == pytest.approx(1.0)
    assert 0.25 < cp["sizes"]["test"] / total < 0.5


def test_cp_split_without_leak_moves_whole_groups():
    dm = EasyVQADataModule(split="cp", cp_leak=0.0)
    dm.setup()
    assert dm.split_report["mean_tv_distance"] == 1.0


def test_cp_split_every_test_answer_is_trainable(cp_dm):
    answers = cp_dm._answers
    train_answers = {answers[i] for i in cp_dm.index["train"]}
    assert {answers[i] for i in cp_dm.index["test"]} <= train_answers


def test_cp_split_is_deterministic_by_seed(cp_dm):
    again = EasyVQADataModule(split="cp", seed=0)
    again.setup()
    other = EasyVQADataModule(split="cp", seed=1)
    other.setup()
    assert np.array_equal(again.index["test"], cp_dm.index["test"])
    assert not np.array_equal(other.index["test"], cp_dm.index["test"])


def test_total_variation():
    assert total_variation({"a": 1.0}, {"b": 1.0}) == 1.0
    assert total_variation({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == 0.0


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    s = EpochShuffleSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    s.set_epoch(0)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first and sorted(first) == list(range(50))


def test_missing_data_dir_names_path_and_expected_files(tmp_path):
    dm = EasyVQADataModule(data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError) as e:
        dm.prepare_data()
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "answers.txt" in msg and "train/questions.json" in msg
    assert "pip install easy-vqa" in msg


@pytest.mark.parametrize(
    "kwargs", [{"split": "vqacp"}, {"val_fraction": 0.0}, {"cp_test_fraction": 1.5}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        EasyVQADataModule(**kwargs)


def test_augment_turns_training_images_only_and_repeats_exactly():
    from vlcompress.datamodules import EasyVQADataModule

    plain = EasyVQADataModule(seed=0)
    plain.setup()
    aug = EasyVQADataModule(seed=0, augment=True)
    aug.setup()
    train, test = aug.index["train"][:64], aug.index["test"][:16]
    a, p = aug.batch_rows(train).visual, plain.batch_rows(train).visual
    changed = [not torch.equal(a[i], p[i]) for i in range(64)]
    assert 30 < sum(changed) < 64  # 7 of 8 symmetries change the image
    for i in range(64):  # each is a symmetry of the square: the same pixels, moved
        assert any(
            torch.equal(a[i], torch.rot90(p[i], k, dims=(1, 2)).flip(2) if f else torch.rot90(p[i], k, dims=(1, 2)))
            for k in range(4) for f in (False, True)
        )  # fmt: skip
    assert torch.equal(aug.batch_rows(train).visual, a)  # seeded: the same again
    assert torch.equal(aug.batch_rows(test).visual, plain.batch_rows(test).visual)
    with pytest.raises(ValueError, match="augment transforms pixels"):
        EasyVQADataModule(augment=True, visual_features="efficientnet_grid")


def test_balanced_weights_equalise_answers_within_each_group():
    from vlcompress.data.sampler import balanced_weights

    groups = ["a"] * 8 + ["b"] * 2
    answers = ["yes"] * 2 + ["no"] * 6 + ["x", "y"]
    w = balanced_weights(groups, answers)
    assert float(w.sum()) == pytest.approx(10.0)  # each group keeps its share
    assert float(w[:2].sum()) == pytest.approx(float(w[2:8].sum())) == pytest.approx(4.0)
    assert float(w[8]) == float(w[9]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one group per answer"):
        balanced_weights(["a"], [])


def test_weighted_sampler_is_seeded_sharded_and_resumable():
    weights = torch.tensor([0.0] * 10 + [1.0] * 10)
    s = EpochShuffleSampler(20, seed=1, weights=weights)
    s.set_epoch(3)
    drawn = list(s)
    assert len(drawn) == 20 and min(drawn) >= 10  # zero weight: never drawn; with replacement
    assert list(s) == drawn
    s.set_epoch(4)
    assert list(s) != drawn
    ranks = [EpochShuffleSampler(20, seed=1, rank=r, world_size=2, weights=weights) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(3)
    assert sorted(list(ranks[0]) + list(ranks[1])) == sorted(drawn)
    resumed = EpochShuffleSampler(20, seed=1, position=lambda: 5, weights=weights)
    resumed.set_epoch(3)
    assert list(resumed) == drawn[5:]
    with pytest.raises(ValueError, match="non-negative"):
        EpochShuffleSampler(3, seed=0, weights=torch.tensor([1.0, -1.0, 1.0]))


def test_balance_answers_draws_yes_and_no_equally_per_template(easy_vqa_dm):
    from collections import Counter

    from vlcompress.datamodules.easy_vqa import question_templates

    dm = EasyVQADataModule(split="standard", balance_answers=True)
    dm.setup()
    assert easy_vqa_dm.train_weights() is None
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(0)
    rows = dm.index["train"][np.asarray(list(sampler))]
    assert len(rows) == len(dm.index["train"])
    template = "is there a _ shape?"  # colours: "yes" 12% of the time as published
    published = Counter(dm._answers[i] for i in dm.index["train"] if dm._templates[i] == template)
    drawn = Counter(dm._answers[i] for i in rows if dm._templates[i] == template)
    assert published["yes"] / sum(published.values()) < 0.2
    assert 0.45 < drawn["yes"] / sum(drawn.values()) < 0.55
    assert question_templates(["Is there a red shape?"], frozenset({"red"})) == [template]
