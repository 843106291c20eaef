"""GQA (balanced questions, release 1.2) with LXMERT's obj36 region features, as a
:class:`VQADataModule`.

Files expected in ``data_dir`` (the published formats, from ``questions1.2.zip`` of
https://cs.stanford.edu/people/dorarad/gqa/download.html):

* ``train_balanced_questions.json``, ``val_balanced_questions.json`` and
  ``testdev_balanced_questions.json`` (``test_questions``): each ONE JSON object keyed by
  question id (a string of digits) -> ``{"imageId", "question", "answer", "fullAnswer",
  "isBalanced", "groups", "types": {"structural", "semantic", "detailed"}, "semantic",
  "annotations", "entailed", "equivalent"}``. Only ``imageId``, ``question``, ``answer`` and
  ``types`` are read (the rest is dropped while parsing, which keeps the 943k training
  questions small in memory). A test file without answers (the submission files) has no
  targets: ``allow_unlabelled_test: true`` reads it for prediction only;
* a region store converted once from LXMERT's GQA features ``vg_gqa_obj36.tsv`` (train and val
  images) and ``gqa_testdev_obj36.tsv`` (the same columns as the COCO obj36 files; images are
  named by GQA's ``imageId`` strings, ``2375429`` or ``n161313``)::

      python -m vlcompress prepare gqa --tsv vg_gqa_obj36.tsv gqa_testdev_obj36.tsv \\
          --out <data_dir>/regions_obj36

``split: standard`` trains on train, validates on val (``val_source: val``; ``train`` carves
``val_fraction`` of train instead and does not read the val file) and tests on testdev;
``split: cp`` pools the parts read and re-splits them with changing priors (shared with every
benchmark, :func:`vlcompress.data.changing_priors_split`).

Answers: GQA has exactly one answer per question, compared as a string by the official
evaluation; here it is lower-cased and stripped (nothing else: the VQA normalisation would
turn ``t-shirt`` into ``t shirt``). The vocabulary holds the answers of at least
``min_answer_count`` (1: all) *training-split* questions, most frequent first; a question's
target is one-hot over it (so the BCE / CE / debiasing losses work unchanged), all-zero for an
answer outside it (such a question is still scored, and counts as wrong).

Accuracy: the shared :class:`~vlcompress.metrics.VQAAccuracy` scores exact match when every
batch carries a question's one answer repeated :data:`ANSWER_REPEATS` (10) times: all ten
"annotators" agree, so the official evaluation skips its normalisation, and the 10-choose-9
average of ``min(1, matches / 3)`` is ``min(1, 9 / 3) = 1`` for the answer and ``0`` for
anything else (one copy would give ``min(1, 0 / 3) = 0`` even for the right answer).

Types: ``types.structural`` (``verify``, ``query``, ``choose``, ``logical``, ``compare``) is
the answer-type breakdown, ``types.detailed`` (about 100 types such as ``relS``) the question
type, so the train-split question-type prior and the debiasing losses work as on VQA.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlcompress.data import RegionStore, VLBatch
from vlcompress.data.answers import AnswerVocab
from vlcompress.datamodules.vqa_v2 import RegionsDataOptions, RegionsVQADataModule
from vlcompress.options import choices, in_range
from vlcompress.registry import register

log = logging.getLogger(__name__)

__all__ = [
    "ANSWER_REPEATS",
    "GQADataModule",
    "GQAOptions",
    "GQAPart",
    "STRUCTURAL_TYPES",
    "load_gqa_questions",
]

GQA_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train_balanced_questions.json",),
    "val": ("val_balanced_questions.json",),
    "test": ("testdev_balanced_questions.json",),
}
"""The balanced question files of GQA 1.2 per part (``test`` follows ``test_questions``)."""

STRUCTURAL_TYPES = ("verify", "query", "choose", "logical", "compare")
"""GQA's structural types: the answer-type breakdown."""

ANSWER_REPEATS = 10
"""Copies of the one answer given to :class:`~vlcompress.metrics.VQAAccuracy` (exact match)."""

UNKNOWN_TYPE = "unknown"
"""Type of an unlabelled test question published without ``types``."""

GQA_SITE = "https://cs.stanford.edu/people/dorarad/gqa/download.html"
LXMERT_FEATURES = (
    "LXMERT's GQA features (https://github.com/airsplay/lxmert, GQA section: "
    "https://nlp.cs.unc.edu/data/lxmert_data/vg_gqa_imgfeat/vg_gqa_obj36.zip and "
    "gqa_testdev_obj36.zip, unzipped)"
)
REGIONS_DIR = "regions_obj36"
_KEPT = ("imageId", "question", "answer", "types")


@dataclass(frozen=True)
class GQAOptions(RegionsDataOptions):
    """Options of ``gqa`` (beyond :class:`RegionsDataOptions`; ``data_dir`` is the folder of
    the balanced question files, the region store comes from ``python -m vlcompress prepare
    gqa``).

    Attributes:
        min_answer_count: training questions an answer must have to enter the vocabulary
            (1: every answer of the training split).
        val_source: ``val`` (validate on ``val_balanced_questions.json``) or ``train`` (hold
            out ``val_fraction`` of the training questions; the val file is not read). The
            ``cp`` split always holds out ``val_fraction`` of its own training part.
        test_questions: the test part's file in ``data_dir`` (e.g.
            ``submission_all_questions.json`` to predict for a submission).
        allow_unlabelled_test: accept a test file without answers (prediction only: its
            batches have no targets and ``test_dataloader`` refuses it); by default such a file
            is an error at set-up, before any training.
    """

    min_answer_count: int = field(default=1, metadata=in_range(1))
    val_source: str = field(default="val", metadata=choices("val", "train"))
    test_questions: str = "testdev_balanced_questions.json"
    allow_unlabelled_test: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.test_questions or Path(self.test_questions).name != self.test_questions:
            raise ValueError(
                f"test_questions must be a file name inside data_dir (e.g. "
                f"'testdev_balanced_questions.json'), got {self.test_questions!r}."
            )


# ---------------------------------------------------------------------------------- the files
@dataclass
class GQAPart:
    """Questions of one or more GQA parts, column-wise.

    Attributes:
        question_id, image_id: GQA's ids, as the strings they are published as.
        question: the question text.
        answer: the answer, lower-cased and stripped (``""`` when unlabelled).
        structural, detailed: ``types.structural`` and ``types.detailed``.
        labelled: per question, whether it has an answer.
    """

    question_id: list[str] = field(default_factory=list)
    image_id: list[str] = field(default_factory=list)
    question: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    structural: list[str] = field(default_factory=list)
    detailed: list[str] = field(default_factory=list)
    labelled: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.question_id)

    def extend(self, other: GQAPart) -> None:
        """Append ``other``'s questions."""
        for f in fields(self):
            getattr(self, f.name).extend(getattr(other, f.name))

    def select(self, rows: Sequence[int]) -> GQAPart:
        """The questions ``rows``, in that order."""
        return GQAPart(**{f.name: [getattr(self, f.name)[i] for i in rows] for f in fields(self)})


def _slim(obj: dict[str, Any]) -> dict[str, Any]:
    """``json`` object hook: of a question keep only the fields read (the semantic program,
    annotations and entailed questions are dropped as soon as they are parsed)."""
    if "imageId" in obj:
        return {k: obj[k] for k in _KEPT if k in obj}
    return obj


def _read_questions(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f, object_hook=_slim)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is "
            f"damaged: unzip it again from questions1.2.zip ({GQA_SITE})."
        ) from e


def _text(path: Path, qid: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"{path}: question {qid!r}: {key!r} is a {type(value).__name__}, expected a string."
        )
    return value


def load_gqa_questions(path: str | Path, *, need_answers: bool) -> GQAPart:
    """Read one GQA balanced questions file (the published format, see the module docstring).

    Args:
        path: e.g. ``train_balanced_questions.json``.
        need_answers: True for a part that trains or validates (every question needs an
            answer); False for a test part, which may have answers for all its questions or
            for none (a submission file).

    Returns:
        The questions in file order; answers lower-cased and stripped.

    Raises:
        ValueError: for invalid JSON, a top level that is not an object keyed by question id,
            a question that lacks a key (the file, the question id and the key are named), or
            answers given for only some questions.
    """
    path = Path(path)
    data = _read_questions(path)
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected one JSON object mapping question ids to questions (GQA's balanced "
            f"questions format); got a {type(data).__name__}. Is this a GQA 1.2 questions file?"
        )
    answered = sum(isinstance(q, dict) and "answer" in q for q in data.values())
    labelled = answered > 0 or need_answers
    part = GQAPart()
    interned: dict[str, str] = {}  # one string object per distinct type / answer (memory)
    for qid, q in data.items():
        if not isinstance(q, dict):
            raise ValueError(
                f"{path}: question {qid!r} is a {type(q).__name__}, expected an object."
            )
        keys = ("imageId", "question", "answer", "types") if labelled else ("imageId", "question")
        missing = [k for k in keys if k not in q]
        types = q.get("types")
        if isinstance(types, dict):
            missing += [f"types.{k}" for k in ("structural", "detailed") if k not in types]
        elif types is not None:
            raise ValueError(
                f"{path}: question {qid!r}: 'types' is a {type(types).__name__}, expected an "
                "object with 'structural' and 'detailed'."
            )
        if missing:
            if answered and "answer" in missing:
                why = " (answers are given for only some of its questions)"
            elif "answer" in missing:
                why = " (a part that trains or validates needs answers)"
            else:
                why = ""
            needs = [*keys, "types.structural", "types.detailed"] if labelled else list(keys)
            raise ValueError(
                f"{path}: question {qid!r} lacks {missing}{why}; every question needs {needs}. "
                f"Is this an unmodified GQA 1.2 balanced questions file ({GQA_SITE})?"
            )
        part.question_id.append(str(qid))
        part.image_id.append(_text(path, qid, "imageId", q["imageId"]))
        part.question.append(_text(path, qid, "question", q["question"]))
        answer = _text(path, qid, "answer", q["answer"]).strip().lower() if labelled else ""
        part.answer.append(interned.setdefault(answer, answer))
        for col, key in ((part.structural, "structural"), (part.detailed, "detailed")):
            t = _text(path, qid, f"types.{key}", types[key]) if types else UNKNOWN_TYPE
            col.append(interned.setdefault(t, t))
        part.labelled.append(labelled)
    return part


def _int_question_ids(ids: Sequence[str], sources: Sequence[str]) -> np.ndarray:
    """GQA's question ids (strings of digits) as int64, for ``VLBatch.question_id``.

    Raises:
        ValueError: for an id that is not a string of at most 18 digits, or two ids that are
            the same number (``"0123"`` and ``"123"``).
    """
    out = np.empty(len(ids), np.int64)
    for i, q in enumerate(ids):
        if not (q.isascii() and q.isdigit() and len(q) <= 18):
            raise ValueError(
                f"{sources[i]}: question id {q!r} is not a string of digits (GQA's ids are, "
                "e.g. '20968379'); batches carry question ids as int64 numbers."
            )
        out[i] = int(q)
    if len(np.unique(out)) != len(out):
        values, counts = np.unique(out, return_counts=True)
        same = [ids[i] for i in np.flatnonzero(out == values[counts > 1][0])]
        raise ValueError(
            f"question ids {same} are the same number; batches carry question ids as int64, so "
            "they must differ as numbers (GQA's do: is a file edited?)."
        )
    return out


# ---------------------------------------------------------------------------------- the module
@register("datamodule", "gqa", options=GQAOptions, context=("seed",))
class GQADataModule(RegionsVQADataModule):
    """GQA balanced questions with obj36 region features: train / val / testdev.

    Shares the region store, text encoding, targets, prior and batches of the VQA v2 modules
    (:mod:`vlcompress.datamodules.vqa_v2`); reads GQA's own files and answers (see the module
    docstring). After ``setup()``, ``question_ids`` holds GQA's string ids per question row and
    :meth:`question_id_strings` maps a batch's int64 ids back to them.

    Args:
        options: :class:`GQAOptions` (``data_dir`` must be set).
        seed: seed of every random choice (validation carve-out, ``cp`` re-split, shuffling).
        **overrides: option fields given directly.

    Raises:
        ValueError: for bad options (see :class:`GQAOptions`).
        MissingInputsError: (a ``FileNotFoundError``) at set-up, listing every missing input
            with where to get it (see :meth:`missing_inputs`).

    Example::

        dm = GQADataModule(data_dir="data/gqa", batch_size=64, max_question_len=29)
        dm.setup(); batch = next(iter(dm.train_dataloader()))  # batch.visual: (64, 36, 2048)
    """

    options_class = GQAOptions
    benchmark = "gqa"
    files: ClassVar[dict[str, tuple[str, ...]]] = GQA_FILES
    data_dir_env = "GQA_DIR"
    feature_tsvs = "vg_gqa_obj36.tsv gqa_testdev_obj36.tsv"
    features = LXMERT_FEATURES
    other_features = ""
    obtain = (
        f"Download questions1.2.zip (GQA 1.2 questions) from {GQA_SITE} and unzip the "
        "balanced files into that folder."
    )

    # ------------------------------------------------------------------ files
    @staticmethod
    def _part_files(options: GQAOptions) -> dict[str, str]:
        out = {"train": GQA_FILES["train"][0]}
        if options.val_source == "val":
            out["val"] = GQA_FILES["val"][0]
        out["test"] = options.test_questions
        return out

    @property
    def part_files(self) -> dict[str, str]:
        """The question file of each part read (``val`` only with ``val_source: val``)."""
        return self._part_files(self.options)

    @classmethod
    def required_files(cls, options: GQAOptions) -> list[str]:
        """The question files ``options.data_dir`` must hold (the val file only with
        ``val_source: val``; the test file is ``test_questions``)."""
        return list(cls._part_files(options).values())

    def prepare_data(self) -> None:
        """Check that the question files, the region store and the tokenizer exist (nothing is
        downloaded or converted here: ``python -m vlcompress prepare gqa`` converts the
        features once).

        Raises:
            MissingInputsError: (a ``FileNotFoundError``) listing every problem at once, each
                with where and how to obtain the input.
        """
        self._require_inputs()
        RegionStore(self.regions_path)

    def _load(self) -> tuple[GQAPart, list[str]]:
        """Every part's questions and the part of each (``train`` / ``val`` / ``test``).

        Raises:
            ValueError: for unlabelled test questions where they cannot be used, or a question
                id found in two files.
        """
        o = self.options
        data, parts, where = GQAPart(), [], {}
        for name, file in self.part_files.items():
            path = self.root / file
            part = load_gqa_questions(path, need_answers=name != "test")
            if name == "test" and len(part) and not part.labelled[0]:
                if o.split == "cp" or not o.allow_unlabelled_test:
                    why = (
                        "split 'cp' re-splits the answered questions of every part"
                        if o.split == "cp"
                        else "a run tests on it after training"
                    )
                    raise ValueError(
                        f"{path}: the test questions have no answers, and {why}. Use the "
                        "labelled testdev_balanced_questions.json of questions1.2.zip, or set "
                        "data.options.allow_unlabelled_test: true (with split: standard) to "
                        "read it for prediction only."
                    )
                log.warning("gqa: %s has no answers: prediction only, no test accuracy", path)
            for qid in part.question_id:
                if qid in where:
                    raise ValueError(
                        f"question id {qid!r} is in both {where[qid]} and {file}; GQA's parts "
                        "are disjoint: is one file given twice?"
                    )
                where[qid] = file
            data.extend(part)
            parts += [name] * len(part)
        return data, parts

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        """Load the questions, map images to store rows, build the answer vocabulary on the
        training split, the one-hot targets, the text encoding and the split (idempotent).

        Raises:
            MissingInputsError: (a ``FileNotFoundError``) listing every missing input at once.
            ValueError: for malformed files, unlabelled test questions (unless
                ``allow_unlabelled_test``), questions whose image has no features (unless
                ``drop_missing_images``), or an empty answer vocabulary.
        """
        if self._ready:
            return
        self._require_inputs()
        self.regions = RegionStore(self.regions_path)
        o = self.options
        data, parts = self._load()
        keep = self._keep_with_features(data, data.image_id)
        if keep is not None:
            data, parts = data.select(keep), [parts[i] for i in keep]
        self.question_ids = data.question_id
        self._question_ids = _int_question_ids(
            data.question_id, [self.part_files[p] for p in parts]
        )
        self._id_strings = dict(zip(self._question_ids.tolist(), data.question_id))
        self._image_rows = self.regions.rows(data.image_id)
        self._labelled = np.asarray(data.labelled, dtype=bool)
        self._answers = [
            [a] * ANSWER_REPEATS if ok else [] for a, ok in zip(data.answer, data.labelled)
        ]
        self._qtypes, self._atypes = data.detailed, data.structural

        if o.split == "standard" and o.val_source == "val":
            arr = np.asarray(parts)
            self.index = {p: np.flatnonzero(arr == p) for p in ("train", "val", "test")}
        else:
            self.index = self.split_indices(parts, self._qtypes, data.answer)
        train = self.index["train"]
        counts = Counter(data.answer[i] for i in train)
        kept = sorted(
            (a for a, c in counts.items() if c >= o.min_answer_count), key=lambda a: (-counts[a], a)
        )
        if not kept:
            raise ValueError(
                f"no answer is given to >= {o.min_answer_count} training questions; lower "
                "data.options.min_answer_count (1 keeps every training answer)."
            )
        self.answer_vocab = AnswerVocab(kept)
        index = self.answer_vocab.index
        self._labels = np.asarray(
            [[index.get(a, -1) if ok else -1] for a, ok in zip(data.answer, data.labelled)],
            dtype=np.int64,
        ).reshape(len(data), 1)
        self._scores = (self._labels >= 0).astype(np.float32)

        self._text_ids = self._encode(data.question, train)
        self.question_types = sorted(set(self._qtypes))
        qt_index = {q: i for i, q in enumerate(self.question_types)}
        self._qtype_ids = np.asarray([qt_index[q] for q in self._qtypes], dtype=np.int64)
        self.answer_types = [*STRUCTURAL_TYPES, *sorted(set(self._atypes) - set(STRUCTURAL_TYPES))]
        self.split_report = self._report(data.answer)
        log.info(
            "gqa %s split: %d train / %d val / %d test questions, %d answers (>= %d), %d "
            "question types, %d questions dropped for missing features",
            o.split, len(train), len(self.index["val"]), len(self.index["test"]),
            len(self.answer_vocab), o.min_answer_count, len(self.question_types), self._dropped,
        )  # fmt: skip
        self._ready = True

    def _report(self, answers: list[str]) -> dict[str, Any]:
        """The split report (an unlabelled test part has no answer distribution)."""
        o, index = self.options, self.index
        labelled_test = bool(self._labelled[index["test"]].all())
        shown = index if labelled_test else {**index, "test": np.zeros(0, np.int64)}
        report = self.split_report_for(self._qtypes, answers, shown)
        report["sizes"]["test"] = len(index["test"])
        in_vocab = self._labels[:, 0] >= 0
        test = index["test"]
        report.update(
            benchmark=self.benchmark,
            answers=len(self.answer_vocab),
            min_answer_count=o.min_answer_count,
            val_source=o.val_source if o.split == "standard" else "train",
            test_questions=o.test_questions,
            test_labelled=labelled_test,
            test_answer_in_vocab=float(in_vocab[test].mean())
            if len(test) and labelled_test
            else None,
            dropped_questions_missing_images=self._dropped,
            region_store=str(self.regions_path),
            region_features=f"{self.regions.max_boxes} x {self.regions.feature_dim} "
            f"{self.regions.manifest['dtype']}",
        )
        return report

    # ------------------------------------------------------------------ batches and ids
    def batch_rows(self, rows: np.ndarray) -> VLBatch:
        """The shared region batch; questions without an answer have no targets (and an empty
        answer list)."""
        batch = super().batch_rows(rows)
        if not self._labelled[rows].all():
            batch.targets = None
        return batch

    def test_dataloader(self) -> DataLoader:
        """Test batches (testdev).

        Raises:
            ValueError: when the test questions have no answers (use ``predict_dataloader``).
        """
        if not self._ready:
            self.setup()
        if not self._labelled[self.index["test"]].all():
            raise ValueError(
                f"gqa: {self.options.test_questions} has no answers, so there is no test "
                "accuracy; use predict_dataloader() for predictions, or test on the labelled "
                "testdev_balanced_questions.json."
            )
        return super().test_dataloader()

    def question_id_strings(self, question_id: torch.Tensor | Sequence[int]) -> list[str]:
        """GQA's string ids (e.g. ``"02930152"``) of a batch's int64 ``question_id``.

        Raises:
            KeyError: for an id that is not one of this module's questions.
        """
        values = question_id.tolist() if isinstance(question_id, torch.Tensor) else question_id
        return [self._id_strings[int(v)] for v in values]
