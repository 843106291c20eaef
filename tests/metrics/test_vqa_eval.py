"""The official VQA answer normalisation and accuracy, rule by rule."""

import pytest

from vlcompress.metrics import answer_accuracy, normalize_answer, soft_score
from vlcompress.metrics.vqa_eval import process_digit_article, process_punctuation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt it", "isn't it"),
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted
        ("red,white", "red white"),  # punctuation not touching a space becomes a space
        ("red, white", "red white"),  # touching a space: deleted
        ("t-shirt", "t shirt"),
        ("  ten\t", "10"),
        ("yes!", "yes"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_and_digit_steps_are_separate():
    assert process_punctuation("what?") == "what "
    assert process_digit_article("A Three") == "3"


def test_period_strip_count_quirk():
    # The official code passes re.UNICODE (32) as `count`: only 32 periods are removed.
    text = "a" + ". a" * 40
    assert process_punctuation(text).count(".") == 8


@pytest.mark.parametrize(
    ("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_leave_one_out_accuracy(matches, expected):
    answers = ["cat"] * matches + [
        "dog",
        "mouse",
        "bird",
        "fish",
        "cow",
        "pig",
        "hen",
        "owl",
        "bee",
        "ant",
    ][: 10 - matches]
    assert answer_accuracy("cat", answers) == pytest.approx(expected)


def test_normalisation_only_when_answers_differ():
    # All ten identical: no normalisation, so "2" does not match "Two".
    assert answer_accuracy("2", ["Two"] * 10) == 0.0
    assert answer_accuracy("Two", ["Two"] * 10) == 1.0
    # Not all identical: both sides are normalised, "Two" and "two" match "2".
    assert answer_accuracy("2", ["Two"] * 9 + ["two"]) == 1.0
    assert answer_accuracy("2", ["Two"] * 9 + ["three"]) == 1.0


def test_accuracy_strips_whitespace_always():
    assert answer_accuracy("yes\n", ["yes"] * 10) == 1.0


def test_soft_score_table():
    assert [soft_score(n) for n in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    with pytest.raises(ValueError):
        soft_score(-1)


def test_empty_answers_rejected():
    with pytest.raises(ValueError, match="at least one"):
        answer_accuracy("yes", [])
