"""Reading and checking the published VQA v2 and VQA-CP v2 question / annotation files.

* VQA v2: ``v2_OpenEnded_mscoco_<subtype>_questions.json`` = ``{"info", "task_type",
  "data_type", "license", "data_subtype", "questions": [{"image_id", "question",
  "question_id"}]}`` and ``v2_mscoco_<subtype>_annotations.json`` = ``{"info", "license",
  "data_subtype", "annotations": [{"question_type", "multiple_choice_answer", "answers":
  [{"answer", "answer_confidence", "answer_id"} x 10], "image_id", "answer_type",
  "question_id"}]}``; ``<subtype>`` is ``train2014`` or ``val2014``.
* VQA-CP v2: ``vqacp_v2_{train,test}_{questions,annotations}.json``, flat JSON lists of the
  same entries, each with a ``coco_split`` (``train2014`` / ``val2014``).

:func:`load_vqa_part` joins a part's questions and annotations into a columnar
:class:`VQAPart`; every entry is checked, and a problem names the file, the entry and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "VQA_CP_V2_FILES",
    "VQA_V2_FILES",
    "VQAPart",
    "coco_image_name",
    "expected_files",
    "load_vqa_part",
]

VQA_V2_FILES: dict[str, tuple[str, str]] = {
    sub: (f"v2_OpenEnded_mscoco_{sub}_questions.json", f"v2_mscoco_{sub}_annotations.json")
    for sub in ("train2014", "val2014")
}
"""VQA v2 question and annotation file names per data subtype."""

VQA_CP_V2_FILES: dict[str, tuple[str, str]] = {
    part: (f"vqacp_v2_{part}_questions.json", f"vqacp_v2_{part}_annotations.json")
    for part in ("train", "test")
}
"""VQA-CP v2 question and annotation file names per part."""

COCO_SPLITS = ("train2014", "val2014", "test2015")
_QUESTION_KEYS = ("image_id", "question", "question_id")
_ANNOTATION_KEYS = ("question_id", "question_type", "answer_type", "multiple_choice_answer")


def coco_image_name(coco_split: str, image_id: int) -> str:
    """The COCO file stem of an image, as LXMERT's feature files name it
    (``COCO_val2014_000000393243``).

    Raises:
        ValueError: for an unknown COCO split.
    """
    if coco_split not in COCO_SPLITS:
        raise ValueError(f"unknown COCO split {coco_split!r}; expected one of {COCO_SPLITS}")
    return f"COCO_{coco_split}_{int(image_id):012d}"


@dataclass
class VQAPart:
    """One part of a VQA benchmark (questions joined with their annotations), column-wise.

    Attributes:
        question_id, image_id, question: per question.
        coco_split: the COCO split holding each question's image.
        question_type, answer_type, multiple_choice_answer: from the annotations.
        answers: the annotators' answer strings per question (raw, as published).
    """

    question_id: list[int] = field(default_factory=list)
    image_id: list[int] = field(default_factory=list)
    question: list[str] = field(default_factory=list)
    coco_split: list[str] = field(default_factory=list)
    question_type: list[str] = field(default_factory=list)
    answer_type: list[str] = field(default_factory=list)
    multiple_choice_answer: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.question_id)

    def image_names(self) -> list[str]:
        """The COCO file stem of each question's image."""
        return [coco_image_name(s, i) for s, i in zip(self.coco_split, self.image_id)]


def expected_files(files: dict[str, tuple[str, str]]) -> list[str]:
    """Every file name of a benchmark's ``*_FILES`` table."""
    return [name for pair in files.values() for name in pair]


def check_files(data_dir: str | Path, names: Sequence[str], how: str) -> None:
    """Raise when ``data_dir`` lacks any of ``names``.

    Args:
        data_dir: the benchmark folder.
        names: the file names expected in it.
        how: where the files come from (appended to the message).

    Raises:
        FileNotFoundError: listing the missing and the expected names.
    """
    root = Path(data_dir)
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data folder {str(root)!r} is missing {missing}; it must hold {list(names)}. {how}"
        )


def _read_json(path: Path) -> Any:
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); the file is "
            "damaged, download it again."
        ) from e


def _entries(path: Path, data: Any, key: str | None) -> list[dict[str, Any]]:
    """The list of entries of a question / annotation file (``data[key]`` or ``data``)."""
    if key is not None:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(
                f"{path}: expected a JSON object with a {key!r} list (the VQA v2 format); got "
                f"{type(data).__name__}{' with keys ' + str(sorted(data)) if isinstance(data, dict) else ''}."
            )
        return data[key]
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: expected a flat JSON list of entries (the VQA-CP v2 format); got "
            f"{type(data).__name__}."
        )
    return data


def _require(path: Path, i: int, entry: Any, keys: Sequence[str]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object.")
    missing = [k for k in keys if k not in entry]
    if missing:
        raise ValueError(
            f"{path}: entry {i} (question_id {entry.get('question_id')!r}) lacks {missing}; "
            f"every entry needs {list(keys)}. Is this the right file?"
        )


def load_vqa_part(
    questions_path: str | Path,
    annotations_path: str | Path,
    *,
    flat: bool,
    coco_split: str | None = None,
) -> VQAPart:
    """Load one part: its questions joined with its annotations by ``question_id``.

    Args:
        questions_path, annotations_path: the two published files of the part.
        flat: True for VQA-CP v2's flat lists (entries carry ``coco_split``), False for VQA v2's
            objects (``questions`` / ``annotations`` lists).
        coco_split: VQA v2: the COCO split of the part's images (``train2014`` / ``val2014``).

    Raises:
        ValueError: for a malformed file (naming the file, the entry and the missing key), a
            question without annotation or the other way round, or a duplicate question id.
    """
    qpath, apath = Path(questions_path), Path(annotations_path)
    q_keys = (*_QUESTION_KEYS, "coco_split") if flat else _QUESTION_KEYS
    a_keys = (*_ANNOTATION_KEYS, "answers", *(("coco_split",) if flat else ()))
    questions = _entries(qpath, _read_json(qpath), None if flat else "questions")
    annotations = _entries(apath, _read_json(apath), None if flat else "annotations")
    by_id: dict[int, dict[str, Any]] = {}
    for i, a in enumerate(annotations):
        _require(apath, i, a, a_keys)
        if not isinstance(a["answers"], list) or not all(
            isinstance(x, dict) and "answer" in x for x in a["answers"]
        ):
            raise ValueError(
                f"{apath}: entry {i} (question_id {a['question_id']}): 'answers' must be a list "
                "of {'answer', 'answer_confidence', 'answer_id'} objects."
            )
        if a["question_id"] in by_id:
            raise ValueError(f"{apath}: question_id {a['question_id']} is annotated twice.")
        by_id[a["question_id"]] = a
    part = VQAPart()
    interned: dict[str, str] = {}  # one string object per distinct answer (memory)
    seen: set[int] = set()
    for i, q in enumerate(questions):
        _require(qpath, i, q, q_keys)
        qid = q["question_id"]
        if qid in seen:
            raise ValueError(f"{qpath}: question_id {qid} appears twice.")
        seen.add(qid)
        a = by_id.get(qid)
        if a is None:
            raise ValueError(
                f"{qpath}: question_id {qid} (entry {i}) has no annotation in {apath}; the two "
                "files must come from the same release and part."
            )
        split = q["coco_split"] if flat else coco_split
        if split not in COCO_SPLITS:
            raise ValueError(
                f"{qpath}: entry {i} (question_id {qid}) has coco_split {split!r}; expected one "
                f"of {COCO_SPLITS}."
            )
        part.question_id.append(int(qid))
        part.image_id.append(int(q["image_id"]))
        part.question.append(str(q["question"]))
        part.coco_split.append(split)
        part.question_type.append(str(a["question_type"]))
        part.answer_type.append(str(a["answer_type"]))
        part.multiple_choice_answer.append(str(a["multiple_choice_answer"]))
        part.answers.append([interned.setdefault(x["answer"], x["answer"]) for x in a["answers"]])
    extra = len(by_id) - len(seen)
    if extra:
        example = next(k for k in by_id if k not in seen)
        raise ValueError(
            f"{apath}: {extra} annotation(s) have no question in {qpath} (e.g. question_id "
            f"{example}); the two files must come from the same release and part."
        )
    return part
