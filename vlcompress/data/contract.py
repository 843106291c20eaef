"""The data contract: what every VQA-style benchmark module provides.

A benchmark module subclasses :class:`VQADataModule` (a ``LightningDataModule``) and, after
``setup()``, provides:

* ``answer_vocab`` (:class:`~vlcompress.data.AnswerVocab`): the classifier's answers, in
  output order; ``answer_types`` and ``question_types``: the categories of the accuracy
  breakdown (every batch carries ``answer_type`` / ``question_type`` strings and
  ``question_type_id`` indices into ``question_types``);
* :meth:`VQADataModule.question_type_prior`: per question type, the mean soft score of each
  answer over the *training* questions of that type (the bias of LMH, PoE, RUBi, LPF);
* ``text_encoding`` (``"words"`` with a ``word_vocab``, or ``"wordpiece"`` with a
  ``tokenizer``) and ``visual_input`` (``"pixels"``, ``"regions"``, ``"grid"``, or ``"pixel_pairs"``: two
  images per example, ``(B, 2, 3, H, W)``, for a model that :func:`reads pairs
  <vlcompress.models.contract.reads_pairs>`): what the model must accept;
* ``split_report``: split sizes and per-type train-vs-test answer distributions.

The split itself is shared: :meth:`VQADataModule.split_indices` turns the benchmark's own
parts into train / val / test, either as published (``split: standard``) or re-split with
changing priors (``split: cp``, :func:`~vlcompress.data.resplit.changing_priors_split`), so
any benchmark can be made VQA-CP-like by configuration. Options shared by every benchmark are
in :class:`VQADataOptions`; a benchmark's own options dataclass extends it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlcompress.data.batch import VLBatch
from vlcompress.data.resplit import answer_distribution_report, changing_priors_split
from vlcompress.data.sampler import EpochShuffleSampler, ShardSampler
from vlcompress.options import check_fields, choices, in_range

__all__ = [
    "PAIR_ANSWERS",
    "DataInfo",
    "TEXT_ENCODINGS",
    "VISUAL_INPUTS",
    "VQADataModule",
    "VQADataOptions",
    "check_data_contract",
]

TEXT_ENCODINGS = ("words", "wordpiece")
VISUAL_INPUTS = ("pixels", "regions", "grid", "pixel_pairs")
PAIR_ANSWERS = ("false", "true")
"""The answers of pair data (``visual_input: pixel_pairs``), in the order of the pair heads'
outputs (NLVR2's False, True)."""


@dataclass(frozen=True)
class VQADataOptions:
    """Options every VQA-style benchmark module accepts.

    Attributes:
        data_dir: folder of the benchmark's files (each module documents what it expects).
        split: ``standard`` (as published) or ``cp`` (re-split with changing priors).
        val_fraction: share of the training questions held out for validation.
        cp_test_fraction: ``cp`` split: per question type, the share of questions sent to test.
        cp_leak: ``cp`` split: share of every (type, answer) group that crosses to the other
            side (0 = whole groups, as VQA-CP).
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        max_question_len: question tokens kept.
        num_workers: data-loader workers.
        cache_dir: where decoded inputs are cached (default ``$VLCOMPRESS_CACHE`` or
            ``~/.cache/vlcompress``).
    """

    data_dir: str | None = None
    split: str = field(default="standard", metadata=choices("standard", "cp"))
    val_fraction: float = field(default=0.1, metadata=in_range(0.0, 1.0, lo_open=True))
    cp_test_fraction: float = field(default=0.33, metadata=in_range(0.0, 1.0, lo_open=True))
    cp_leak: float = field(default=0.1, metadata=in_range(0.0, 0.5))
    batch_size: int = field(default=128, metadata=in_range(1))
    eval_batch_size: int = field(default=512, metadata=in_range(1))
    max_question_len: int = field(default=14, metadata=in_range(1))
    num_workers: int = field(default=0, metadata=in_range(0))
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DataInfo:
    """What the rest of a run needs to know about the data (see :meth:`VQADataModule.info`)."""

    answers: list[str]
    answer_types: list[str]
    question_types: list[str]
    vocab_size: int
    text_encoding: str
    visual_input: str
    question_type_prior: torch.Tensor | None
    report: dict[str, Any] = field(default_factory=dict)


class _Rows(Dataset):
    """The question rows of one part; a whole batch is read at once (``__getitems__``)."""

    def __init__(self, dm: VQADataModule, rows: np.ndarray) -> None:
        self.dm, self.rows = dm, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> VLBatch:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> VLBatch:
        return self.dm.batch_rows(self.rows[np.asarray(indices, dtype=np.int64)])


def _identity(batch: VLBatch) -> VLBatch:
    return batch


class VQADataModule(L.LightningDataModule):
    """Base of every VQA-style benchmark module (see the module docstring for the contract).

    Subclasses set ``text_encoding`` / ``visual_input``, fill ``answer_vocab``,
    ``answer_types``, ``question_types``, ``split_report``, ``index`` (``{"train"|"val"|"test":
    question rows}``) (and ``word_vocab`` or ``tokenizer``) in ``setup()``, set ``_ready`` at its
    end, and implement :meth:`question_type_prior` and :meth:`batch_rows`; the data loaders
    come from here.
    """

    text_encoding: ClassVar[str] = "words"
    visual_input: ClassVar[str] = "regions"

    def __init__(self, options: VQADataOptions, seed: int = 0) -> None:
        super().__init__()
        self.options, self.seed = options, seed
        self.batch_size, self.eval_batch_size = options.batch_size, options.eval_batch_size
        self.split_report: dict[str, Any] = {}

    def question_type_prior(self) -> torch.Tensor:
        """``(len(question_types), len(answers))`` mean soft scores over the training split.

        This default reads the dense per-row soft scores ``_targets`` and question-type indices
        ``_qtype_ids`` that a module keeping them in memory sets in ``setup()``; a module that
        stores its targets otherwise overrides it."""
        from vlcompress.data.priors import question_type_prior

        if not getattr(self, "_ready", False):
            self.setup()
        train = torch.as_tensor(self.index["train"])
        return question_type_prior(
            self._targets[train], self._qtype_ids[train], len(self.question_types)
        )

    def encode_texts(self, texts: list[str], train: np.ndarray) -> torch.Tensor:
        """``(len(texts), max_question_len)`` token ids of ``texts`` (0 = padding): with
        ``words``, a vocabulary built on the ``train`` rows (set as ``word_vocab``); with
        ``wordpiece``, ``[CLS] ... [SEP]`` of the tokenizer in ``options.tokenizer`` (unset: the
        uncased WordPieces of MiniLM; set as ``tokenizer``). Each distinct text is encoded once."""
        from vlcompress.data.text import WordVocab, wordpiece_tokenizer

        length = self.options.max_question_len
        if self.text_encoding == "words":
            self.word_vocab = WordVocab.build(texts[i] for i in train)
            return self.word_vocab.encode(texts, length)
        self.tokenizer = wordpiece_tokenizer(getattr(self.options, "tokenizer", None))
        unique = sorted(set(texts))
        row = {t: i for i, t in enumerate(unique)}
        encoded = self.tokenizer(unique, padding="max_length", truncation=True,
                                 max_length=length, return_tensors="pt")["input_ids"]  # fmt: skip
        return encoded[torch.tensor([row[t] for t in texts], dtype=torch.long)].long()

    def batch_rows(self, rows: np.ndarray) -> VLBatch:
        """The batch of the question rows ``rows`` (int64 indices into the module's arrays)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loaders
    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        if not getattr(self, "_ready", False):
            self.setup()
        bs = self.batch_size if part == "train" else self.eval_batch_size
        rows = self.index[part]
        return DataLoader(
            _Rows(self, rows),
            batch_size=bs,
            sampler=self.train_sampler(len(rows)) if shuffle else self.eval_sampler(len(rows)),
            collate_fn=_identity,
            num_workers=self.options.num_workers,
            persistent_workers=self.options.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (carved from train)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Test batches, for prediction."""
        return self._loader("test", shuffle=False)

    def split_indices(
        self, parts: Sequence[str], question_types: Sequence[str], answers: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Train / val / test question indices for the configured split.

        Args:
            parts: the published part of each question (``"train"`` or ``"test"``; other
                parts are ignored by ``standard`` and pooled by ``cp``).
            question_types, answers: per question (majority answer).

        Returns:
            ``{"train", "val", "test"}`` sorted index arrays; val is carved from train with
            ``val_fraction``; every choice is seeded by ``seed``.
        """
        o = self.options
        rng = random.Random(self.seed)
        parts_arr = np.asarray(parts)
        if o.split == "standard":
            train_all = np.flatnonzero(parts_arr == "train")
            test = np.flatnonzero(parts_arr == "test")
        else:
            train_l, test_l = changing_priors_split(
                question_types, answers, o.cp_test_fraction, o.cp_leak, rng
            )
            train_all, test = np.asarray(train_l, dtype=np.int64), np.asarray(test_l)
        perm = np.array(rng.sample(range(len(train_all)), len(train_all)), dtype=np.int64)
        n_val = max(1, int(round(o.val_fraction * len(train_all))))
        return {
            "train": np.sort(train_all[perm[n_val:]]),
            "val": np.sort(train_all[perm[:n_val]]),
            "test": np.sort(np.asarray(test, dtype=np.int64)),
        }

    def _ranks(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _consumed(self) -> int:
        """Training indices this rank already consumed in the current epoch (non-zero only when
        a run resumes in the middle of an epoch)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return int(done) * self.options.batch_size

    def train_weights(self) -> torch.Tensor | None:
        """Sampling weights of the training rows (``None``: each row once per epoch); a
        module with an answer-balancing option returns them (see :func:`balanced_weights`)."""
        return None

    def train_sampler(self, n: int) -> EpochShuffleSampler:
        """The training sampler over ``n`` examples: seeded per epoch, sharded over the ranks,
        resumable in the middle of an epoch, weighted by :meth:`train_weights`."""
        rank, world = self._ranks()
        return EpochShuffleSampler(
            n, self.seed, rank, world, position=self._consumed, weights=self.train_weights()
        )

    def eval_sampler(self, n: int) -> ShardSampler:
        """The validation / test sampler: this rank's shard, every example exactly once."""
        rank, world = self._ranks()
        return ShardSampler(n, rank, world)

    def split_report_for(
        self, question_types: Sequence[str], answers: Sequence[str], index: dict[str, Any]
    ) -> dict[str, Any]:
        """The split report (sizes, per-type answer distributions, TV distances)."""
        return answer_distribution_report(question_types, answers, index, self.options.split)

    def vocab_size(self) -> int:
        """Size of the text vocabulary the model's embedding needs."""
        if self.text_encoding == "words":
            return len(self.word_vocab)
        return int(self.tokenizer.vocab_size)

    def info(self) -> DataInfo:
        """A summary for the task, the model and the run folder (call after ``setup``)."""
        return DataInfo(
            answers=list(self.answer_vocab.answers),
            answer_types=list(self.answer_types),
            question_types=list(self.question_types),
            vocab_size=self.vocab_size(),
            text_encoding=self.text_encoding,
            visual_input=self.visual_input,
            question_type_prior=self.question_type_prior(),
            report=self.split_report,
        )


def check_data_contract(dm: Any) -> list[str]:
    """Problems with a set-up data module's contract (empty when it fulfils it)."""
    problems = []
    for attr in ("answer_vocab", "answer_types", "question_types", "split_report"):
        if not hasattr(dm, attr):
            problems.append(f"{type(dm).__name__} has no {attr!r} after setup()")
    if getattr(dm, "text_encoding", None) not in TEXT_ENCODINGS:
        problems.append(f"text_encoding must be one of {TEXT_ENCODINGS}")
    if getattr(dm, "visual_input", None) not in VISUAL_INPUTS:
        problems.append(f"visual_input must be one of {VISUAL_INPUTS}")
    encoding = getattr(dm, "text_encoding", None)
    needs = {"words": "word_vocab", "wordpiece": "tokenizer"}.get(encoding)
    if needs and not hasattr(dm, needs):
        problems.append(f"text_encoding {encoding!r} needs a {needs!r} after setup()")
    if problems:
        return problems
    prior = dm.question_type_prior()
    shape = (len(dm.question_types), len(dm.answer_vocab))
    if tuple(prior.shape) != shape:
        problems.append(f"question_type_prior() has shape {tuple(prior.shape)}, expected {shape}")
    return problems
