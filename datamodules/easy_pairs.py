"""easy-pairs: NLVR2's formulation (two images, one statement about both, True / False) on the
real easy-VQA images, so that pair models and their heads run here.

**Derived data, not a published benchmark.** Each easy-VQA image shows one shape in one colour;
its shape and colour are read from the image's own easy-VQA questions and answers (a "what
shape" / "what color" answer, a shape or colour named in a question answered yes, or the one
value left when every other is answered no); images whose shape or colour the questions do not
determine (about 11%) are left out. Statements follow ten templates
(:data:`TEMPLATES`: "both shapes are red", "the left shape is a circle and the right one is not
blue", "exactly one shape is teal", ...). Every statement text is generated once True and once
False, so the labels are balanced per text: a model that reads only the statement (the blind
baseline) scores exactly 0.5, overall and per template. For a wanted label, the pair's
(shape, colour) combination is drawn uniformly among those that make the statement so, then
one image of each. Everything is seeded by ``seed``.

Pairs of the training split use easy-VQA's training images (validation is carved from them);
test pairs use its test images. Templates are the question types (blind baselines and the
accuracy breakdown per template); the answers are ``false`` and ``true`` (the order of ViLT's
NLVR2 head). Batches hold ``visual`` ``(B, 2, 3, 64, 64)`` in [0, 1] (left, right).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vlcompress.data import AnswerVocab, VLBatch
from vlcompress.data.contract import PAIR_ANSWERS
from vlcompress.datamodules.easy_vqa import EasyVQADataModule, EasyVQAOptions
from vlcompress.options import in_range
from vlcompress.registry import register

log = logging.getLogger(__name__)

__all__ = ["TEMPLATES", "EasyPairsDataModule", "EasyPairsOptions", "image_attributes"]

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
NUM_ANNOTATORS = 10

Attr = tuple[str, str]  # (shape, colour)


@dataclass(frozen=True)
class Template:
    """A statement template: its name (the question type), its text with ``{s}`` (a shape)
    and / or ``{c}`` (a colour), and its truth over (left, right) attributes and the fill."""

    name: str
    text: str
    truth: Callable[[Attr, Attr, str, str], bool]


TEMPLATES: tuple[Template, ...] = (
    Template("both color", "both shapes are {c}", lambda a, b, s, c: a[1] == c and b[1] == c),
    Template("both shape", "both images show a {s}", lambda a, b, s, c: a[0] == s and b[0] == s),
    Template("left shape right color", "the left shape is a {s} and the right one is {c}",
             lambda a, b, s, c: a[0] == s and b[1] == c),
    Template("left shape right not color", "the left shape is a {s} and the right one is not {c}",
             lambda a, b, s, c: a[0] == s and b[1] != c),
    Template("left color right shape", "the left shape is {c} and the right shape is a {s}",
             lambda a, b, s, c: a[1] == c and b[0] == s),
    Template("same color", "the two shapes have the same color",
             lambda a, b, s, c: a[1] == b[1]),
    Template("same shape", "both images show the same kind of shape",
             lambda a, b, s, c: a[0] == b[0]),
    Template("exactly one color", "exactly one shape is {c}",
             lambda a, b, s, c: (a[1] == c) != (b[1] == c)),
    Template("at least one shape", "at least one image shows a {s}",
             lambda a, b, s, c: a[0] == s or b[0] == s),
    Template("right shape", "the right image shows a {s}", lambda a, b, s, c: b[0] == s),
)  # fmt: skip
"""The statement templates; each template's name is its question type."""


def image_attributes(rows: list[list[Any]]) -> dict[int, Attr]:
    """Each image's (shape, colour), read from its easy-VQA questions (see the module
    docstring); images they do not determine are left out.

    Args:
        rows: easy-VQA ``questions.json`` rows ``[question, answer, image_id]``.

    Raises:
        ValueError: when an image's questions contradict each other (two shapes or colours).
    """
    vocab = set(SHAPES) | set(COLORS)
    pos: dict[int, set[str]] = defaultdict(set)
    neg: dict[int, set[str]] = defaultdict(set)
    for question, answer, image in rows:
        words = re.findall(r"[a-z]+", question.lower())
        named = {w for w in words if w in vocab}
        if answer in vocab:
            pos[int(image)] |= named | {answer}
        elif answer in ("yes", "no"):
            negated = "not" in words or "no" in words
            (pos if (answer == "yes") != negated else neg)[int(image)] |= named
    out = {}
    for image in {int(r[2]) for r in rows}:
        values = []
        for options in (set(SHAPES), set(COLORS)):
            known = pos[image] & options
            if len(known) > 1:
                raise ValueError(
                    f"easy-VQA image {image}: its questions name {sorted(known)} as its "
                    "attribute; the questions.json is inconsistent (re-install easy-vqa)."
                )
            left = known or (options - neg[image])
            values.append(next(iter(left)) if len(left) == 1 else None)
        if None not in values:
            out[image] = (values[0], values[1])
    return out


@dataclass(frozen=True)
class EasyPairsOptions(EasyVQAOptions):
    """easy-pairs options: those of easy-VQA (the images, the text encoding, batch sizes),
    plus the number of statements.

    Attributes:
        num_train: statements generated over easy-VQA's training images (validation carved
            from them with ``val_fraction``); even.
        num_test: statements over its test images; even.
        max_question_len: statement tokens kept (the longest template has 17 WordPieces with
            [CLS] and [SEP]).
    """

    num_train: int = field(default=20000, metadata=in_range(2))
    num_test: int = field(default=4000, metadata=in_range(2))
    max_question_len: int = field(default=20, metadata=in_range(1))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split != "standard":
            raise ValueError(
                "easy_pairs: only split: standard (train pairs over easy-VQA's training "
                "images, test pairs over its test images); drop data.options.split: cp."
            )
        for name in ("num_train", "num_test"):
            if getattr(self, name) % 2:
                raise ValueError(
                    f"easy_pairs: {name} must be even (each statement text comes once True and "
                    f"once False), not {getattr(self, name)}."
                )
        if self.exclude_questions is not None:
            raise ValueError(
                "easy_pairs generates its own statements: exclude_questions does not apply; "
                "drop it."
            )
        if self.visual_features != "pixels":
            raise ValueError(
                "easy_pairs serves image pairs as pixels; set data.options.visual_features: pixels."
            )
        if self.balance_answers:
            raise ValueError(
                "easy_pairs statements are True and False equally often by construction: "
                "balance_answers does not apply; drop it."
            )


def generate_pairs(
    attributes: dict[int, Attr], count: int, rng: random.Random
) -> list[tuple[int, int, str, str, bool]]:
    """``count`` statements over the images of ``attributes``: ``(left image, right image,
    template name, text, label)``, each text once True and once False.

    Raises:
        ValueError: for an odd ``count``.
    """
    if count % 2:
        raise ValueError(f"easy_pairs: the number of statements must be even, not {count}.")
    by_attr: dict[Attr, list[int]] = defaultdict(list)
    for image, attr in sorted(attributes.items()):
        by_attr[attr].append(image)
    present = sorted(by_attr)
    combos_of: dict[tuple[str, str, str, bool], list[tuple[Attr, Attr]]] = {}
    out = []
    for _ in range(count // 2):
        template = rng.choice(TEMPLATES)
        s, c = rng.choice(SHAPES), rng.choice(COLORS)
        text = template.text.format(s=s, c=c)
        for label in (True, False):
            key = (template.name, s, c, label)
            if key not in combos_of:
                combos_of[key] = [(a, b) for a in present for b in present
                                  if template.truth(a, b, s, c) == label]  # fmt: skip
            a, b = rng.choice(combos_of[key])
            out.append((rng.choice(by_attr[a]), rng.choice(by_attr[b]), template.name, text,
                        label))  # fmt: skip
    return out


@register("datamodule", "easy_pairs", options=EasyPairsOptions, context=("seed",))
class EasyPairsDataModule(EasyVQADataModule):
    """easy-pairs: two easy-VQA images and a statement about both, True / False (derived;
    see the module docstring).

    Args:
        options: :class:`EasyPairsOptions`.
        seed: seed of the statements, the validation carve-out and the shuffling.
        **overrides: option fields given directly, e.g. ``EasyPairsDataModule(num_train=200)``.

    Example::

        dm = EasyPairsDataModule(num_train=2000, num_test=400, text_encoding="wordpiece")
        dm.prepare_data(); dm.setup()
        batch = next(iter(dm.train_dataloader()))   # batch.visual: (B, 2, 3, 64, 64)
    """

    visual_input = "pixel_pairs"
    registered_name = "easy_pairs"
    options_type = EasyPairsOptions

    def setup(self, stage: str | None = None) -> None:
        """Read the images' attributes and generate the statements (idempotent)."""
        if self._ready:
            return
        self._check_files()
        o: EasyPairsOptions = self.options  # type: ignore[assignment]
        rng = random.Random(self.seed)
        arrays, examples, parts = [], [], []
        offset = 0
        for part, count in (("train", o.num_train), ("test", o.num_test)):
            rows = json.loads((self.root / part / "questions.json").read_text())
            arr = np.load(self._image_cache(part))
            attributes = image_attributes(rows)
            for left, right, template, text, label in generate_pairs(attributes, count, rng):
                examples.append((offset + left, offset + right, template, text, label))
                parts.append(part)
            arrays.append(arr)
            offset += arr.shape[0]
        self._images = torch.from_numpy(np.concatenate(arrays))
        self._grid = None
        self._pairs = torch.tensor([(e[0], e[1]) for e in examples], dtype=torch.long)
        self._qtypes = [e[2] for e in examples]
        self._texts = [e[3] for e in examples]
        self._answers = [PAIR_ANSWERS[int(e[4])] for e in examples]
        self._atypes = ["true/false"] * len(examples)
        self.answer_vocab = AnswerVocab(list(PAIR_ANSWERS))
        self._targets = self.answer_vocab.targets([[a] * NUM_ANNOTATORS for a in self._answers])
        self.index = self.split_indices(parts, self._qtypes, self._answers)
        self._text_ids = self.encode_texts(self._texts, self.index["train"])
        self.question_types = [t.name for t in TEMPLATES]
        qt_index = {q: i for i, q in enumerate(self.question_types)}
        self._qtype_ids = torch.tensor([qt_index[q] for q in self._qtypes], dtype=torch.long)
        self.answer_types = ["true/false"]
        self.split_report = self.split_report_for(self._qtypes, self._answers, self.index)
        self.split_report["derived_from"] = "easy-VQA images (see datamodules/easy_pairs.py)"
        log.info("easy-pairs: %d train / %d val / %d test statements over %d templates",
                 len(self.index["train"]), len(self.index["val"]), len(self.index["test"]),
                 len(TEMPLATES))  # fmt: skip
        self._ready = True

    def batch_rows(self, rows: np.ndarray) -> VLBatch:
        """The statements ``rows`` with their image pairs ``(B, 2, 3, 64, 64)``."""
        r = torch.as_tensor(rows)
        ids = self._text_ids[r]
        pairs = self._images[self._pairs[r]]  # (B, 2, 64, 64, 3)
        visual = pairs.permute(0, 1, 4, 2, 3).float().div_(255.0)
        answers = [self._answers[i] for i in r.tolist()]
        return VLBatch(
            text_ids=ids,
            text_mask=ids != 0,
            visual=visual,
            targets=self._targets[r],
            question_id=r.clone(),
            question_type=[self._qtypes[i] for i in r.tolist()],
            question_type_id=self._qtype_ids[r],
            answer_type=[self._atypes[i] for i in r.tolist()],
            answers=[[a] * NUM_ANNOTATORS for a in answers],
        )
