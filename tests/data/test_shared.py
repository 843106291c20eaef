"""Shared data pieces: the question-type prior, the changing-priors re-split, the contract."""

import random

import pytest
import torch

from vlcompress.data import (
    VQADataModule,
    VQADataOptions,
    changing_priors_split,
    check_data_contract,
    question_type_prior,
    total_variation,
)


def test_question_type_prior_is_the_mean_soft_score_per_type():
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 1.0, 0.0], [1.0, 0.6, 0.0], [0.0, 0.0, 1.0]])
    types = torch.tensor([0, 0, 1, 0])
    prior = question_type_prior(targets, types, 3)
    torch.testing.assert_close(prior[0], torch.tensor([1 / 3, 1 / 3, 1.3 / 3]))
    torch.testing.assert_close(prior[1], torch.tensor([1.0, 0.6, 0.0]))
    assert prior[2].abs().sum() == 0  # a type without training questions
    with pytest.raises(ValueError, match=r"ids must be in \[0, 1\)"):
        question_type_prior(targets, types, 1)


def _synthetic(n_per=40):
    qtypes, answers = [], []
    colours, yes_no = ["red", "blue", "green"], ["yes", "no"]
    for qt, ans in (("what color", colours), ("which color", colours), ("is there", yes_no),
                    ("is it", yes_no)):  # fmt: skip
        for a in ans:
            qtypes += [qt] * n_per
            answers += [a] * n_per
    return qtypes, answers


@pytest.mark.parametrize("leak", [0.0, 0.1])
def test_changing_priors_split_reverses_priors_but_keeps_answers_learnable(leak):
    qtypes, answers = _synthetic()
    train, test = changing_priors_split(qtypes, answers, 0.33, leak, random.Random(0))
    assert sorted(train + test) == list(range(len(qtypes)))  # a partition
    for qt in set(qtypes):

        def dist(idx, qt=qt):
            sel = [answers[i] for i in idx if qtypes[i] == qt]
            return {a: sel.count(a) / len(sel) for a in set(sel)}

        if dist(test):
            tv = total_variation(dist(train), dist(test))
            assert tv > 0.6, (qt, tv)
    assert {answers[i] for i in test} <= {answers[i] for i in train}  # learnable
    assert len(test) > 0.15 * len(qtypes)
    again = changing_priors_split(qtypes, answers, 0.33, leak, random.Random(0))
    assert again == (train, test)  # deterministic by the seed


def test_changing_priors_split_checks_its_arguments():
    with pytest.raises(ValueError, match="test_fraction"):
        changing_priors_split(["a"], ["x"], 1.0, 0.0, random.Random(0))
    with pytest.raises(ValueError, match="2 question types but 1 answers"):
        changing_priors_split(["a", "b"], ["x"], 0.3, 0.0, random.Random(0))


class Minimal(VQADataModule):
    """The smallest module that fulfils the contract (what a new benchmark must provide)."""

    def setup(self, stage=None):
        from vlcompress.data import AnswerVocab, WordVocab

        qtypes, answers = _synthetic(10)
        parts = ["train" if i % 4 else "test" for i in range(len(qtypes))]
        self.index = self.split_indices(parts, qtypes, answers)
        self.answer_vocab = AnswerVocab(sorted(set(answers)))
        self.word_vocab = WordVocab.build(qtypes)
        self.answer_types, self.question_types = ["yes/no", "other"], sorted(set(qtypes))
        self.split_report = self.split_report_for(qtypes, answers, self.index)
        self._targets = self.answer_vocab.targets([[a] * 10 for a in answers])
        qt = {q: i for i, q in enumerate(self.question_types)}
        self._ids = torch.tensor([qt[q] for q in qtypes])

    def question_type_prior(self):
        t = torch.as_tensor(self.index["train"])
        return question_type_prior(self._targets[t], self._ids[t], len(self.question_types))


@pytest.mark.parametrize("split", ["standard", "cp"])
def test_any_module_gets_both_splits_by_configuration(split):
    dm = Minimal(VQADataOptions(split=split, val_fraction=0.2), seed=3)
    dm.setup()
    assert check_data_contract(dm) == []
    idx = dm.index
    assert not set(idx["train"]) & set(idx["val"]) and not set(idx["train"]) & set(idx["test"])
    tv = dm.split_report["mean_tv_distance"]
    assert (tv > 0.5) if split == "cp" else (tv < 0.2)
    assert dm.info().question_type_prior.shape == (4, 5)


def test_contract_problems_are_named():
    dm = Minimal(VQADataOptions())
    assert "has no 'answer_vocab' after setup()" in check_data_contract(dm)[0]
    with pytest.raises(ValueError, match="split: 'cpp' is not one of"):
        VQADataOptions(split="cpp")
