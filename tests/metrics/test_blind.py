"""The blind-model check: the balanced baseline of a constant answer per question type, the
flag in results, and the line in the results table."""

from __future__ import annotations

import pytest

from vlcompress.cli import results_table
from vlcompress.data.resplit import answer_distribution_report as split_report
from vlcompress.metrics import BLIND_MARGIN, blind_check, blind_text


def test_constant_answer_per_type_scores_one_over_k_balanced():
    # type "color": 3 answers in test; type "yes/no": 2; type "only_train": none in test
    qtypes = ["color"] * 6 + ["yesno"] * 4 + ["only_train"]
    answers = ["red", "red", "blue", "red", "blue", "green", "yes", "no", "yes", "yes", "x"]
    index = {"train": [0, 1, 2, 6, 7, 10], "val": [], "test": [3, 4, 5, 8, 9]}
    rep = split_report(qtypes, answers, index, "test-split")
    per = rep["per_question_type"]
    assert per["color"]["constant_balanced_baseline"] == pytest.approx(1 / 3)
    assert per["yesno"]["constant_balanced_baseline"] == pytest.approx(1 / 1)  # test: only yes
    assert "constant_balanced_baseline" not in per["only_train"]
    assert rep["blind_balanced_baseline"] == pytest.approx((1 / 3 + 1) / 2)


@pytest.mark.parametrize(
    ("balanced", "blind"), [(0.378, True), (0.376 + BLIND_MARGIN - 1e-4, True), (0.43, False)]
)
def test_flag_within_the_margin(balanced, blind):
    check = blind_check({"balanced_accuracy": balanced}, {"blind_balanced_baseline": 0.376})
    assert check["answers_without_image"] is blind
    assert check["margin"] == pytest.approx(balanced - 0.376)
    assert blind_text(check).startswith("ANSWERS WITHOUT THE IMAGE" if blind else "sees the image")


def test_types_answered_blind_are_named_even_when_the_whole_run_sees():
    # a deep MCAN of issue 20: colours and shapes read, every yes/no type at its prior
    per_type = {
        "what color is": {"constant_balanced_baseline": 1 / 7},
        "is there a": {"constant_balanced_baseline": 0.5},
        "is": {"constant_balanced_baseline": 0.5},
        "only yes": {"constant_balanced_baseline": 1.0},  # one test answer: no verdict
    }
    test = {
        "balanced_accuracy": 0.757,
        "balanced_question_type": {
            "what color is": 0.993, "is there a": 0.5, "is": 0.5 + BLIND_MARGIN + 1e-3,
            "only yes": 1.0,
        },
    }  # fmt: skip
    check = blind_check(test, {"blind_balanced_baseline": 0.376}, per_type)
    assert check["answers_without_image"] is False
    assert check["blind_question_types"] == ["is there a"]
    assert blind_text(check).endswith("; BLIND ON 1 question type(s): is there a")
    assert blind_check(test, {"blind_balanced_baseline": 0.376})["blind_question_types"] == []


def test_no_check_without_both_numbers():
    assert blind_check({"accuracy": 0.9}, {"blind_balanced_baseline": 0.4}) is None
    assert blind_check({"balanced_accuracy": 0.9}, {}) is None
    assert blind_text(None) == ""


def test_results_table_prints_the_flag():
    from rich.console import Console

    results = {
        "experiment": "x", "model": "m", "test": {"accuracy": 0.64, "balanced_accuracy": 0.378},
        "data": {"prior_baseline": 0.60, "anti_prior_baseline": 0.23},
        "blind": blind_check({"balanced_accuracy": 0.378}, {"blind_balanced_baseline": 0.376}),
    }  # fmt: skip
    console = Console(width=200, record=True)
    console.print(results_table(results))
    text = console.export_text()
    assert "reads the image?" in text
    assert "ANSWERS WITHOUT THE IMAGE (balanced 0.378, blind 0.376)" in text
