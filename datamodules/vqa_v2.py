"""VQA v2 and VQA-CP v2 with LXMERT's obj36 region features (or the COCO images, for models
that read pixels), as :class:`VQADataModule` s.

Files expected in ``data_dir`` (the published formats, see :mod:`vlcompress.data.vqa_files`):

* ``vqa_v2``: ``v2_OpenEnded_mscoco_{train2014,val2014}_questions.json`` and
  ``v2_mscoco_{train2014,val2014}_annotations.json``; ``split: standard`` trains on train2014
  (``val_fraction`` of it held out for validation) and tests on val2014;
* ``vqa_cp_v2``: ``vqacp_v2_{train,test}_{questions,annotations}.json``; ``split: standard``
  is VQA-CP's own train / test;
* both: a region store converted once from LXMERT's obj36 TSV files
  (``python -m vlcompress prepare vqa_v2 --tsv train2014_obj36.tsv val2014_obj36.tsv --out
  <data_dir>/regions_obj36``), read through memory maps during training;
* or, with ``visual_features: images`` (ViLT, METER: ``visual_input`` ``pixels``), the COCO
  images in ``image_dir`` as COCO publishes them (``train2014/COCO_train2014_<12-digit
  id>.jpg``, ``val2014/...``; ``test2015/`` for test-dev / test-std questions, which these
  modules do not load), resized once by ViLT's rule (shorter side 384, longer at most 639,
  multiples of 32; :class:`~vlcompress.data.images.ResizeRule`) into a checked cache
  (:class:`~vlcompress.data.images.ImageCache`) and padded per batch: ``visual`` ``(B, 3, H,
  W)`` in [0, 1] and ``visual_mask`` ``(B, H, W)`` (True on real pixels). ViLT reads
  ``text_encoding: wordpiece`` questions of up to ``max_question_len: 40`` tokens.

``split: cp`` pools both parts and re-splits them with changing priors (shared by every
benchmark, :func:`vlcompress.data.changing_priors_split`).

Answers follow the standard codebases (bottom-up-attention-vqa's ``compute_softscore.py``,
whose answer lists LXMERT and the VQA-CP debiasing code reuse): the vocabulary holds the
normalised ``multiple_choice_answer`` s given to at least ``min_answer_count`` (9) questions,
counted over both published parts (``answer_vocab_from: all``, which yields their 3,129 VQA v2
answers) or over the training questions only (``train``); a question's target for an answer
given by ``c`` of its annotators is 0 / .3 / .6 / .9 / 1 for ``c`` = 0..4+ (``soft_score: step``,
theirs) or ``min(1, c / 3)`` (``linear``). Answers are normalised with the official VQA
evaluation's rules (:func:`vlcompress.metrics.vqa_eval.normalize_answer`). Question types
(the 65 VQA prefixes) and answer types come from the annotations; the question-type prior is
computed on the training questions.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from vlcompress.data import VLBatch, VQADataModule, VQADataOptions, WordVocab
from vlcompress.data.answers import AnswerVocab
from vlcompress.data.images import (
    VILT_LONGER,
    VILT_SHORTER,
    ImageCache,
    ResizeRule,
    default_cache_dir,
    pad_images,
)
from vlcompress.data.regions import RegionStore, convert_obj36
from vlcompress.data.text import wordpiece_tokenizer
from vlcompress.data.vqa_files import (
    VQA_CP_V2_FILES,
    VQA_V2_FILES,
    MissingInputsError,
    VQAPart,
    data_dir_problems,
    expected_files,
    load_vqa_part,
    regions_problems,
    tokenizer_problems,
)
from vlcompress.metrics.vqa_eval import normalize_answer, soft_score
from vlcompress.options import check_fields, choices, in_range, positive
from vlcompress.registry import register

log = logging.getLogger(__name__)

__all__ = [
    "RegionsDataOptions",
    "RegionsVQADataModule",
    "VQACPv2DataModule",
    "VQAv2DataModule",
    "VQAv2Options",
    "soft_targets",
]

REGIONS_DIR = "regions_obj36"
ANSWER_TYPES = ("yes/no", "number", "other")
COCO_FEATURES = (
    "LXMERT's obj36 features (data/mscoco_imgfeat/{train2014,val2014}_obj36.zip of "
    "https://github.com/airsplay/lxmert, unzipped)"
)
COCO_IMAGES = (
    "Download the COCO 2014 images (train2014.zip, val2014.zip from "
    "https://cocodataset.org/#download) and unzip them into that folder."
)
CLIP_GRID = (
    "; CLIP grid features of the COCO images instead: `python -m vlcompress prepare clip-grid "
    "--images <train2014> <val2014> --checkpoint RN50.pt --out {out}`"
)


@dataclass(frozen=True)
class RegionsDataOptions(VQADataOptions):
    """Options of every benchmark read from question files and a region store (VQA v2,
    VQA-CP v2, GQA), beyond :class:`VQADataOptions`.

    Attributes:
        data_dir: folder of the question / annotation files (no default: set it).
        regions_dir: the region store from ``python -m vlcompress prepare`` (default
            ``<data_dir>/regions_obj36``).
        text_encoding: ``words`` (a word vocabulary built on the training questions) or
            ``wordpiece`` (a BERT tokenizer from the local folder ``tokenizer``; ``[CLS]`` and
            ``[SEP]`` count towards ``max_question_len``).
        tokenizer: local Hugging Face folder of the WordPiece tokenizer (nothing is downloaded).
        drop_missing_images: drop questions whose image has no region features (counted in the
            data report) instead of stopping with an error.
    """

    regions_dir: str | None = None
    text_encoding: str = field(default="words", metadata=choices("words", "wordpiece"))
    tokenizer: str | None = None
    drop_missing_images: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.text_encoding == "wordpiece" and not self.tokenizer:
            raise ValueError(
                "text_encoding 'wordpiece' needs tokenizer: a local folder with a BERT "
                "tokenizer (vocab.txt / tokenizer.json), e.g. the pretrained model's folder."
            )


@dataclass(frozen=True)
class VQAv2Options(RegionsDataOptions):
    """Options of ``vqa_v2`` and ``vqa_cp_v2`` (beyond :class:`RegionsDataOptions`).

    Attributes:
        min_answer_count: questions an answer must be the majority answer of to enter the
            vocabulary (9 as bottom-up-attention-vqa; OpenVQA's "> 8" is the same).
        answer_vocab_from: count answers over ``all`` published parts (the standard codebases)
            or over the ``train`` questions only.
        soft_score: ``step`` (0/.3/.6/.9/1, bottom-up-attention-vqa) or ``linear``
            (``min(1, count / 3)``).
        visual_features: ``regions`` (the region store) or ``images`` (the COCO images of
            ``image_dir``, resized and padded: ``visual_input`` ``pixels``).
        image_dir: ``images``: the folder holding COCO's ``train2014/`` and ``val2014/``.
        shorter, longer, size_divisor: ``images``: the resize rule (ViLT: 384, 639, 32; see
            :class:`~vlcompress.data.images.ResizeRule`).
        image_cache_verify: ``images``: ``size`` (each cache shard's size when opened; its
            SHA-256 is checked once, when it is written) or ``checksum`` (also every shard's
            SHA-256 in every process: the full check, ~80 GB read for COCO).
    """

    min_answer_count: int = field(default=9, metadata=in_range(1))
    answer_vocab_from: str = field(default="all", metadata=choices("all", "train"))
    soft_score: str = field(default="step", metadata=choices("step", "linear"))
    visual_features: Literal["regions", "images"] = "regions"
    image_dir: str | None = None
    shorter: int = positive(VILT_SHORTER)
    longer: int = positive(VILT_LONGER)
    size_divisor: int = positive(32)
    image_cache_verify: Literal["size", "checksum"] = "size"

    def __post_init__(self) -> None:
        super().__post_init__()
        ResizeRule(self.shorter, self.longer, self.size_divisor)  # raises for a bad rule


def soft_targets(
    annotator_answers: list[list[str]], index: dict[str, int], mode: str = "step"
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse soft targets: for each question, the vocabulary answers its annotators gave.

    Args:
        annotator_answers: per question, the *normalised* annotator answers.
        index: answer -> output index.
        mode: ``step`` (0/.3/.6/.9/1 for 0..4+ annotators) or ``linear`` (``min(1, c / 3)``).

    Returns:
        ``labels`` ``(N, K)`` int64 (``-1`` pads) and ``scores`` ``(N, K)`` float32, K the most
        distinct vocabulary answers of one question.

    Raises:
        ValueError: for an unknown ``mode``.
    """
    if mode not in ("step", "linear"):
        raise ValueError(f"soft score mode must be 'step' or 'linear', got {mode!r}")
    rows = []
    for answers in annotator_answers:
        counts = Counter(answers)
        rows.append(
            [
                (index[a], soft_score(c) if mode == "step" else min(1.0, c / 3.0))
                for a, c in counts.items()
                if a in index
            ]
        )
    k = max((len(r) for r in rows), default=0) or 1
    labels = np.full((len(rows), k), -1, np.int64)
    scores = np.zeros((len(rows), k), np.float32)
    for i, r in enumerate(rows):
        for j, (lab, s) in enumerate(r):
            labels[i, j], scores[i, j] = lab, s
    return labels, scores


class RegionsVQADataModule(VQADataModule):
    """What ``vqa_v2``, ``vqa_cp_v2`` and ``gqa`` share: files, region store, answers,
    loaders. A subclass sets :attr:`options_class`, :attr:`benchmark`, :attr:`files`,
    :attr:`obtain`, :attr:`data_dir_env` and :attr:`features`."""

    visual_input = "regions"
    options_class: ClassVar[type[RegionsDataOptions]] = VQAv2Options
    benchmark: ClassVar[str] = ""
    files: ClassVar[dict[str, tuple[str, ...]]] = {}
    obtain: ClassVar[str] = ""
    data_dir_env: ClassVar[str | None] = None
    """The environment variable the shipped experiments read ``data_dir`` from."""
    feature_tsvs: ClassVar[str] = "train2014_obj36.tsv val2014_obj36.tsv"
    features: ClassVar[str] = COCO_FEATURES
    """Where the files of ``feature_tsvs`` come from."""
    other_features: ClassVar[str] = CLIP_GRID
    """Other stores the module reads and how to make them (``{out}``: the store's path)."""
    image_folders: ClassVar[tuple[str, ...]] = ("train2014/", "val2014/")
    """``visual_features: images``: the COCO folders ``image_dir`` must hold."""

    def __init__(
        self, options: RegionsDataOptions | None = None, seed: int = 0, **overrides: Any
    ) -> None:
        if options is None:
            options = self.options_class(**overrides)
        elif overrides:
            options = replace(options, **overrides)
        super().__init__(options, seed)
        self.text_encoding = options.text_encoding
        if self.reads_images(options):
            self.visual_input = "pixels"
        self._image_cache: ImageCache | None = None
        self._prepared_parts: list[tuple[str, VQAPart]] | None = None
        self._ready = False

    @staticmethod
    def reads_images(options: RegionsDataOptions) -> bool:
        """Whether ``options`` ask for the images (``visual_features: images``)."""
        return getattr(options, "visual_features", "regions") == "images"

    # ------------------------------------------------------------------ files
    @classmethod
    def required_files(cls, options: RegionsDataOptions) -> list[str]:
        """The files ``options.data_dir`` must hold."""
        return expected_files(cls.files)

    @classmethod
    def missing_inputs(cls, options: RegionsDataOptions) -> list[str]:
        """Every problem with the inputs ``options`` name, one line each (``[]``: none).

        Checks existence only (nothing is loaded): the question / annotation files in
        ``data_dir``, the region store and the ``wordpiece`` tokenizer folder. Each line names
        the option to set and how to obtain the input; each expected file is named once.
        """
        make = (
            f"make it once from {cls.features} with `python -m vlcompress prepare "
            f"{cls.benchmark} --tsv {cls.feature_tsvs} --out {{out}}`{cls.other_features}"
        )
        if cls.reads_images(options):
            visual = data_dir_problems(
                options.image_dir,  # type: ignore[attr-defined]
                list(cls.image_folders),
                obtain=COCO_IMAGES,
                option="data.options.image_dir (visual_features: images)",
            )
        else:
            visual = regions_problems(options.data_dir, options.regions_dir, REGIONS_DIR, make)
        return [
            *data_dir_problems(
                options.data_dir,
                cls.required_files(options),
                obtain=cls.obtain,
                env=cls.data_dir_env,
            ),
            *visual,
            *tokenizer_problems(options.text_encoding, options.tokenizer),
        ]

    def _require_inputs(self) -> None:
        """Raise :class:`MissingInputsError` listing every problem of :meth:`missing_inputs`."""
        problems = self.missing_inputs(self.options)
        if problems:
            raise MissingInputsError(self.benchmark, problems)

    @property
    def root(self) -> Path:
        """The folder of the question and annotation files.

        Raises:
            MissingInputsError: when ``data_dir`` is not set (it has no default).
        """
        if not self.options.data_dir:
            raise MissingInputsError(
                self.benchmark,
                data_dir_problems(
                    None, self.required_files(self.options), obtain=self.obtain,
                    env=self.data_dir_env,
                ),
            )  # fmt: skip
        return Path(self.options.data_dir)

    @property
    def regions_path(self) -> Path:
        """The region store folder in use."""
        o = self.options
        return Path(o.regions_dir) if o.regions_dir else self.root / REGIONS_DIR

    @property
    def image_cache(self) -> ImageCache:
        """``visual_features: images``: the resized-image cache (under ``cache_dir``, keyed by
        ``image_dir`` and the resize rule)."""
        if self._image_cache is None:
            o: VQAv2Options = self.options  # type: ignore[assignment]
            self._image_cache = ImageCache(
                Path(o.image_dir).expanduser(),
                default_cache_dir(o.cache_dir),
                ResizeRule(o.shorter, o.longer, o.size_divisor),
                verify=o.image_cache_verify,
            )
        return self._image_cache

    @staticmethod
    def image_files(data: VQAPart) -> list[str]:
        """Each question's COCO image file, relative to ``image_dir``
        (``val2014/COCO_val2014_000000000042.jpg``)."""
        return [f"{s}/{n}.jpg" for s, n in zip(data.coco_split, data.image_names())]

    def _absent_images(self, files: list[str]) -> set[str]:
        """The ``files`` that are neither cached nor in ``image_dir`` (each folder listed once)."""
        root = Path(self.options.image_dir).expanduser()  # type: ignore[attr-defined]
        listed: dict[str, set[str]] = {}
        absent = set()
        for f in self.image_cache.missing(files):
            folder, _, name = f.rpartition("/")
            if folder not in listed:
                d = root / folder
                listed[folder] = {e.name for e in os.scandir(d)} if d.is_dir() else set()
            if name not in listed[folder]:
                absent.add(f)
        return absent

    @classmethod
    def prepare_regions(
        cls, tsv: list[str], out: str | Path, *, dtype: str = "float16", max_boxes: int = 36
    ) -> Path:
        """Convert obj36 TSV files into the region store this module reads (see
        :func:`vlcompress.data.regions.convert_obj36`; ``python -m vlcompress prepare``)."""
        return convert_obj36(tsv, out, dtype=dtype, max_boxes=max_boxes)

    def _load_parts(self) -> list[tuple[str, VQAPart]]:
        """The benchmark's parts as ``("train" | "test", part)``."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Check that the JSON files, the region store and the tokenizer exist (nothing is
        downloaded or converted here: ``python -m vlcompress prepare`` converts the features
        once). With ``visual_features: images``: check every question's image and resize the
        images once into the cache.

        Safe on every rank of a launch at once (``vlcompress.run`` calls it on each), and with
        ``vqa_v2`` and ``vqa_cp_v2`` sharing one cache folder: the cache is built under a file
        lock, so one process resizes the images while the others wait and then reuse them
        (:class:`~vlcompress.data.images.ImageCache`).

        Raises:
            MissingInputsError: (a ``FileNotFoundError``) listing every problem at once.
            FileNotFoundError: ``images``: a question's image is missing (unless
                ``drop_missing_images``).
        """
        self._require_inputs()
        if not self.reads_images(self.options):
            RegionStore(self.regions_path)
            return
        self._prepared_parts = self._load_parts()  # setup() in this process reuses them
        data = VQAPart()
        for _, part in self._prepared_parts:
            for col in data.__dataclass_fields__:
                getattr(data, col).extend(getattr(part, col))
        files = self.image_files(data)
        keep = self._keep_with_image_files(data)  # raises for a missing image unless dropping
        if keep is not None:
            files = [files[i] for i in keep]
        self.image_cache.ensure(files, description=f"resizing {self.benchmark} images")

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        """Load questions and annotations, map images to store rows, build vocabularies,
        targets and the split (idempotent).

        Raises:
            MissingInputsError: (a ``FileNotFoundError``) listing every missing input at once.
            ValueError: for questions whose image has no features (unless
                ``drop_missing_images``), or malformed files.
        """
        if self._ready:
            return
        self._require_inputs()
        images_in = self.reads_images(self.options)
        self.regions = None if images_in else RegionStore(self.regions_path)
        o = self.options
        parts, data = [], VQAPart()
        loaded, self._prepared_parts = self._prepared_parts or self._load_parts(), None
        for name, part in loaded:
            parts += [name] * len(part)
            for col in data.__dataclass_fields__:
                getattr(data, col).extend(getattr(part, col))
        images = data.image_names()
        keep = self._keep_with_features(data, images)
        if keep is not None:
            parts = [parts[i] for i in keep]
            images = [images[i] for i in keep]
            for col in data.__dataclass_fields__:
                setattr(data, col, [getattr(data, col)[i] for i in keep])
        if images_in:
            files = self.image_files(data)
            self.image_cache.ensure(files, description=f"resizing {self.benchmark} images")
            self._image_rows = self.image_cache.rows(files)
        else:
            self._image_rows = self.regions.rows(images)
        self._question_ids = np.asarray(data.question_id, dtype=np.int64)
        self._answers = data.answers
        self._qtypes, self._atypes = data.question_type, data.answer_type

        cache: dict[str, str] = {}

        def norm(a: str) -> str:
            if a not in cache:
                cache[a] = normalize_answer(a)
            return cache[a]

        majority = [norm(a) for a in data.multiple_choice_answer]
        self.index = self.split_indices(parts, self._qtypes, majority)
        train = self.index["train"]
        counted = range(len(majority)) if o.answer_vocab_from == "all" else train
        counts = Counter(majority[i] for i in counted)  # question ids are unique: one per question
        kept = sorted(
            (a for a, c in counts.items() if c >= o.min_answer_count), key=lambda a: (-counts[a], a)
        )
        if not kept:
            raise ValueError(
                f"no answer is the majority answer of >= {o.min_answer_count} questions; lower "
                "data.options.min_answer_count (the standard is 9 on the full data)."
            )
        self.answer_vocab = AnswerVocab(kept)
        normalised = [[norm(a) for a in answers] for answers in data.answers]
        self._labels, self._scores = soft_targets(normalised, self.answer_vocab.index, o.soft_score)

        self._text_ids = self._encode(data.question, train)
        self.question_types = sorted(set(self._qtypes))
        qt_index = {q: i for i, q in enumerate(self.question_types)}
        self._qtype_ids = np.asarray([qt_index[q] for q in self._qtypes], dtype=np.int64)
        self.answer_types = [*ANSWER_TYPES, *sorted(set(self._atypes) - set(ANSWER_TYPES))]
        report = self.split_report_for(self._qtypes, majority, self.index)
        in_vocab = np.asarray([a in self.answer_vocab.index for a in majority])
        report.update(
            benchmark=self.benchmark,
            answers=len(self.answer_vocab),
            min_answer_count=o.min_answer_count,
            answer_vocab_from=o.answer_vocab_from,
            soft_score=o.soft_score,
            train_majority_answer_in_vocab=float(in_vocab[train].mean()) if len(train) else 0.0,
            dropped_questions_missing_images=self._dropped,
        )
        if images_in:
            report.update(
                visual_features="images",
                image_dir=str(o.image_dir),
                image_cache=str(self.image_cache.folder),
                resize=self.image_cache.rule.key(),
            )
        else:
            report.update(
                region_store=str(self.regions_path),
                region_features=f"{self.regions.max_boxes} x {self.regions.feature_dim} "
                f"{self.regions.manifest['dtype']}",
            )
        self.split_report = report
        log.info(
            "%s %s split: %d train / %d val / %d test questions, %d answers (>= %d), %d "
            "question types, %d questions dropped for missing features",
            self.benchmark, o.split, len(train), len(self.index["val"]), len(self.index["test"]),
            len(self.answer_vocab), o.min_answer_count, len(self.question_types), self._dropped,
        )  # fmt: skip
        self._ready = True

    def _keep_with_features(self, data: VQAPart, images: list[str]) -> list[int] | None:
        """Questions to keep (``None``: all); raises for missing features unless dropping."""
        self._dropped = 0
        if self.regions is None:  # visual_features: images
            return self._keep_with_image_files(data)
        missing = set(self.regions.missing(images))
        if not missing:
            return None
        bad = [i for i, img in enumerate(images) if img in missing]
        if self.options.drop_missing_images:
            self._dropped = len(bad)
            log.warning(
                "%s: dropped %d question(s) whose %d image(s) have no region features in %s",
                self.benchmark, len(bad), len(missing), self.regions_path,
            )  # fmt: skip
            return [i for i in range(len(images)) if images[i] not in missing]
        i = bad[0]
        raise ValueError(
            f"{len(bad)} question(s) refer to {len(missing)} image(s) without region features "
            f"in {str(self.regions_path)!r}; e.g. question {data.question_id[i]} "
            f"({data.question[i]!r}) needs image {images[i]!r}. Convert the obj36 TSV holding "
            f"these images into the store (`python -m vlcompress prepare {self.benchmark} --tsv "
            f"<all the TSV files the questions need> --out {self.regions_path}`; for CLIP grid "
            "features `python -m vlcompress prepare clip-grid --images <all the COCO image "
            "folders> ...`; a finished store must be deleted first), or set "
            "data.options.drop_missing_images: true to drop them (counted in the data report)."
        )

    def _keep_with_image_files(self, data: VQAPart) -> list[int] | None:
        """``visual_features: images``: :meth:`_keep_with_features` for image files."""
        files = self.image_files(data)
        missing = self._absent_images(files)
        if not missing:
            return None
        bad = [i for i, f in enumerate(files) if f in missing]
        root = Path(self.options.image_dir).expanduser()  # type: ignore[attr-defined]
        if self.options.drop_missing_images:
            self._dropped = len(bad)
            log.warning("%s: dropped %d question(s) whose %d image(s) are missing in %s",
                        self.benchmark, len(bad), len(missing), root)  # fmt: skip
            return [i for i in range(len(files)) if files[i] not in missing]
        i = bad[0]
        raise FileNotFoundError(
            f"{len(bad)} question(s) refer to {len(missing)} image(s) missing in "
            f"data.options.image_dir {str(root)!r}; e.g. question {data.question_id[i]} "
            f"({data.question[i]!r}) needs {str(root / files[i])!r}. {COCO_IMAGES} Or set "
            "data.options.drop_missing_images: true to drop them (counted in the data report)."
        )

    def _encode(self, questions: list[str], train: np.ndarray) -> torch.Tensor:
        """Question token ids ``(N, max_question_len)`` (0 pads)."""
        o = self.options
        if o.text_encoding == "words":
            self.word_vocab = WordVocab.build(questions[i] for i in train)
            return self.word_vocab.encode(questions, o.max_question_len)
        self.tokenizer = wordpiece_tokenizer(o.tokenizer)
        enc = self.tokenizer(
            questions,
            padding="max_length",
            truncation=True,
            max_length=o.max_question_len,
            return_tensors="pt",
        )
        return enc["input_ids"].long()

    # ------------------------------------------------------------------ targets and prior
    def targets(self, rows: np.ndarray) -> torch.Tensor:
        """Dense soft targets ``(len(rows), num_answers)`` of question ``rows``."""
        labels = torch.from_numpy(self._labels[rows])
        scores = torch.from_numpy(self._scores[rows])
        out = torch.zeros(len(rows), len(self.answer_vocab) + 1)
        out.scatter_(1, labels.where(labels >= 0, len(self.answer_vocab)), scores)
        return out[:, :-1]

    def question_type_prior(self) -> torch.Tensor:
        """Per question type, the mean soft score of each answer over the training questions
        (a type without training questions gets a zero row)."""
        if not self._ready:
            self.setup()
        train = self.index["train"]
        labels = torch.from_numpy(self._labels[train])
        scores = torch.from_numpy(self._scores[train]).double()
        types = torch.from_numpy(self._qtype_ids[train])
        num_types, num_answers = len(self.question_types), len(self.answer_vocab)
        sums = torch.zeros(num_types, num_answers + 1, dtype=torch.float64)
        valid = labels >= 0
        rows = types[:, None].expand_as(labels)[valid]
        sums.index_put_((rows, labels[valid]), scores[valid], accumulate=True)
        counts = torch.bincount(types, minlength=num_types).clamp(min=1).double()
        return (sums[:, :num_answers] / counts[:, None]).float()

    # ------------------------------------------------------------------ batches
    def batch_rows(self, rows: np.ndarray) -> VLBatch:
        """Region features read from the memory-mapped store, a whole batch at a time (with
        ``visual_features: images``: the resized images, padded, ``(B, 3, H, W)`` in [0, 1]
        with their pixel mask ``(B, H, W)``)."""
        if self.regions is None:
            feats, mask = pad_images(self.image_cache.read(self._image_rows[rows]))
            boxes = None
        else:
            feats, boxes, mask = self.regions.batch(self._image_rows[rows])
        ids = self._text_ids[torch.from_numpy(rows)]
        rl = rows.tolist()
        return VLBatch(
            text_ids=ids,
            text_mask=ids != 0,
            visual=feats,
            visual_mask=mask,
            boxes=boxes,
            targets=self.targets(rows),
            question_id=torch.as_tensor(self._question_ids[rows]),
            question_type=[self._qtypes[i] for i in rl],
            question_type_id=torch.as_tensor(self._qtype_ids[rows]),
            answer_type=[self._atypes[i] for i in rl],
            answers=[self._answers[i] for i in rl],
        )


@register("datamodule", "vqa_v2", options=VQAv2Options, context=("seed",))
class VQAv2DataModule(RegionsVQADataModule):
    """VQA v2 with obj36 region features: train2014 to train (and validate), val2014 to test.

    Args:
        options: :class:`VQAv2Options` (``data_dir`` must be set).
        seed: seed of every random choice (validation carve-out, ``cp`` re-split, shuffling).
        **overrides: option fields given directly.

    Raises:
        ValueError: for bad options (see :class:`VQAv2Options`).
        MissingInputsError: (a ``FileNotFoundError``) at set-up, listing every missing input
            (see :meth:`missing_inputs`).

    Example::

        dm = VQAv2DataModule(data_dir="data/vqa_v2", batch_size=256)
        dm.setup(); batch = next(iter(dm.train_dataloader()))  # batch.visual: (256, 36, 2048)
    """

    benchmark = "vqa_v2"
    files = VQA_V2_FILES
    data_dir_env = "VQA_DIR"
    obtain = (
        "Download and unzip the VQA v2 questions and annotations (train and val 2014) from "
        "https://visualqa.org/download.html into that folder."
    )

    def _load_parts(self) -> list[tuple[str, VQAPart]]:
        out = []
        for name, sub in (("train", "train2014"), ("test", "val2014")):
            q, a = VQA_V2_FILES[sub]
            out.append(
                (name, load_vqa_part(self.root / q, self.root / a, flat=False, coco_split=sub))
            )
        return out


@register("datamodule", "vqa_cp_v2", options=VQAv2Options, context=("seed",))
class VQACPv2DataModule(RegionsVQADataModule):
    """VQA-CP v2 (changing priors) with obj36 region features: its own train / test parts.

    Args:
        options: :class:`VQAv2Options` (``data_dir`` must be set).
        seed: seed of every random choice (validation carve-out, shuffling).
        **overrides: option fields given directly.

    Raises:
        ValueError: for bad options (see :class:`VQAv2Options`).
        MissingInputsError: (a ``FileNotFoundError``) at set-up, listing every missing input
            (see :meth:`missing_inputs`).

    Example::

        dm = VQACPv2DataModule(data_dir="data/vqacp_v2", max_question_len=14)
        dm.setup(); dm.question_type_prior().shape  # (65 question types, answers)
    """

    benchmark = "vqa_cp_v2"
    files = VQA_CP_V2_FILES
    data_dir_env = "VQACP_DIR"
    obtain = (
        "Download the VQA-CP v2 files (vqacp_v2_{train,test}_{questions,annotations}.json) "
        "from https://www.cc.gatech.edu/grads/a/aagrawal307/vqa-cp/ into that folder."
    )

    def _load_parts(self) -> list[tuple[str, VQAPart]]:
        return [
            (part, load_vqa_part(self.root / q, self.root / a, flat=True))
            for part, (q, a) in VQA_CP_V2_FILES.items()
        ]
