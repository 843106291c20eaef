"""Small VQA v2 / VQA-CP v2 / obj36 fixtures written in exactly the published formats.

Six COCO images (four of train2014, two of val2014) and 30 questions (five per image) with ten
annotator answers each; the region features are LXMERT obj36 TSV rows (base64 of raw numpy
buffers). The question pool is explicit so that tests can count by hand:

* ``NUMBER_QID``'s annotators answer ``two, 2, Two, 2, 2 , 3, 3, three, 4, many``: normalised
  ``2`` x5, ``3`` x3, ``4`` x1, ``many`` x1;
* ``purple`` is the majority answer of exactly one question (dropped at ``min_answer_count: 2``);
* in VQA-CP, ``frisbee`` is the majority answer of test questions only.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import numpy as np

IMAGES = [  # (COCO split, image id, height, width)
    ("train2014", 9, 480, 640),
    ("train2014", 25, 426, 640),
    ("train2014", 30, 428, 640),
    ("train2014", 34, 425, 640),
    ("val2014", 42, 640, 480),
    ("val2014", 73, 478, 640),
]
COLORS = ["red", "red", "blue", "red", "blue", "purple"]
HELD = ["umbrella", "umbrella", "kite", "kite", "frisbee", "frisbee"]
NUMBER_ANSWERS = ["two", "2", "Two", "2", "2 ", "3", "3", "three", "4", "many"]
NUMBER_QID = 9002  # image 9, question 2


def image_name(split: str, image_id: int) -> str:
    """COCO file stem, as LXMERT's TSV names images."""
    return f"COCO_{split}_{image_id:012d}"


def question_pool() -> list[dict]:
    """The 30 questions: dicts with the question and annotation fields of VQA v2."""
    pool = []
    for k, (split, img, _, _) in enumerate(IMAGES):
        yes = k % 2 == 0
        rows = [
            ("What color is the bus?", "what color is the", "other", COLORS[k],
             [COLORS[k]] * 7 + ["dark " + COLORS[k], "the " + COLORS[k], "orange"]),
            ("Is there a dog in the picture?", "is there a", "yes/no", "yes" if yes else "no",
             (["yes"] * 8 + ["no"] * 2) if yes else (["no"] * 9 + ["Yes."])),
            ("How many people are there?", "how many", "number", "2" if k == 0 else str(k),
             NUMBER_ANSWERS if k == 0 else [str(k)] * 6 + [str(k + 1)] * 4),
            ("What is the man holding?", "what is the man", "other", HELD[k],
             [HELD[k]] * 6 + ["an " + HELD[k]] * 2 + ["nothing", "stick"]),
            ("Is this a kitchen?", "is this a", "yes/no", "no" if yes else "yes",
             ["no"] * 10 if yes else ["yes"] * 10),
        ]  # fmt: skip
        for j, (question, qtype, atype, mc, answers) in enumerate(rows):
            assert len(answers) == 10
            pool.append(
                {
                    "coco_split": split,
                    "image_id": img,
                    "question_id": img * 1000 + j,
                    "question": question,
                    "question_type": qtype,
                    "answer_type": atype,
                    "multiple_choice_answer": mc,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(answers)
                    ],
                }
            )
    return pool


def _question(q: dict, flat: bool) -> dict:
    out = {"image_id": q["image_id"], "question": q["question"], "question_id": q["question_id"]}
    return {**out, "coco_split": q["coco_split"]} if flat else out


def _annotation(q: dict, flat: bool) -> dict:
    keys = ["question_type", "multiple_choice_answer", "answers", "image_id", "answer_type"]
    out = {k: q[k] for k in keys} | {"question_id": q["question_id"]}
    return {**out, "coco_split": q["coco_split"]} if flat else out


_INFO = {"description": "fixture", "version": "2.0", "year": 2017}
_LICENSE = {"url": "http://creativecommons.org/licenses/by/4.0/", "name": "CC BY 4.0"}


def write_vqa_v2(folder: Path) -> list[dict]:
    """Write the four VQA v2 files (train2014 / val2014) into ``folder``; returns the pool."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = question_pool()
    for sub in ("train2014", "val2014"):
        part = [q for q in pool if q["coco_split"] == sub]
        questions = {
            "info": _INFO, "task_type": "Open-Ended", "data_type": "mscoco",
            "license": _LICENSE, "data_subtype": sub,
            "questions": [_question(q, False) for q in part],
        }  # fmt: skip
        annotations = {
            "info": _INFO, "license": _LICENSE, "data_subtype": sub,
            "annotations": [_annotation(q, False) for q in part],
        }  # fmt: skip
        (folder / f"v2_OpenEnded_mscoco_{sub}_questions.json").write_text(json.dumps(questions))
        (folder / f"v2_mscoco_{sub}_annotations.json").write_text(json.dumps(annotations))
    return pool


def cp_part(q: dict) -> str:
    """VQA-CP-like assignment: per question type, whole answer groups go to one side."""
    test_answers = {"no", "frisbee", "blue", "3", "4", "5"}
    return "test" if q["multiple_choice_answer"] in test_answers else "train"


def write_vqa_cp_v2(folder: Path) -> list[dict]:
    """Write the four VQA-CP v2 files (flat lists, ``coco_split`` on every entry)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = question_pool()
    for part in ("train", "test"):
        rows = [q for q in pool if cp_part(q) == part]
        (folder / f"vqacp_v2_{part}_questions.json").write_text(
            json.dumps([_question(q, True) for q in rows])
        )
        (folder / f"vqacp_v2_{part}_annotations.json").write_text(
            json.dumps([_annotation(q, True) for q in rows])
        )
    return pool


def _b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii")


def obj36_row(name: str, h: int, w: int, boxes: np.ndarray, features: np.ndarray) -> str:
    """One obj36 TSV line (with its newline)."""
    n = len(boxes)
    rng = np.random.default_rng(n)
    fields = [
        name, str(h), str(w),
        _b64(rng.integers(0, 1600, n).astype(np.int64)), _b64(rng.random(n).astype(np.float32)),
        _b64(rng.integers(0, 400, n).astype(np.int64)), _b64(rng.random(n).astype(np.float32)),
        str(n), _b64(boxes.astype(np.float32)), _b64(features.astype(np.float32)),
    ]  # fmt: skip
    return "\t".join(fields) + "\n"


def image_regions(
    name: str, h: int, w: int, num_boxes: int = 36, dim: int = 2048, seed: int = 0
) -> dict:
    """Deterministic pixel boxes and features of one image."""
    rng = np.random.default_rng([zlib.crc32(name.encode()), seed])
    x = np.sort(rng.uniform(0, w, (num_boxes, 2)), axis=1)
    y = np.sort(rng.uniform(0, h, (num_boxes, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)
    features = rng.standard_normal((num_boxes, dim)).astype(np.float32)
    return {"h": h, "w": w, "boxes": boxes, "features": features}


def write_obj36_tsv(path: Path, images: list[tuple[str, int, int]], **kw) -> dict[str, dict]:
    """Write an obj36 TSV of ``images`` = ``[(name, height, width)]``; returns each image's
    pixel boxes and features (``kw`` go to :func:`image_regions`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {name: image_regions(name, h, w, **kw) for name, h, w in images}
    with path.open("w") as f:
        for name, r in out.items():
            f.write(obj36_row(name, r["h"], r["w"], r["boxes"], r["features"]))
    return out


def write_coco_tsvs(folder: Path, dim: int = 2048) -> tuple[list[Path], dict[str, dict]]:
    """``train2014_obj36.tsv`` and ``val2014_obj36.tsv`` for the six fixture images."""
    regions, paths = {}, []
    for split in ("train2014", "val2014"):
        images = [(image_name(s, i), h, w) for s, i, h, w in IMAGES if s == split]
        path = folder / f"{split}_obj36.tsv"
        regions |= write_obj36_tsv(path, images, dim=dim)
        paths.append(path)
    return paths, regions


def prepared_benchmark(folder: Path, benchmark: str, dim: int = 2048) -> dict:
    """Write a benchmark's JSON files and TSVs into ``folder`` and convert the features into
    ``folder/regions_obj36``. Returns ``{"data_dir", "tsv", "regions", "pool"}``."""
    from vlcompress.data.regions import convert_obj36

    writer = write_vqa_v2 if benchmark == "vqa_v2" else write_vqa_cp_v2
    pool = writer(folder)
    tsv, regions = write_coco_tsvs(folder / "tsv", dim=dim)
    convert_obj36(tsv, folder / "regions_obj36", dtype="float32", progress=False)
    return {"data_dir": folder, "tsv": tsv, "regions": regions, "pool": pool}


def fixture_datamodule(folder: Path, benchmark: str, **options):
    """A set-up ``vqa_v2`` / ``vqa_cp_v2`` data module on freshly written fixture files."""
    from vlcompress import registry

    prepared_benchmark(folder, benchmark)
    opts = {"data_dir": str(folder), "min_answer_count": 1, "batch_size": 8} | options
    dm = registry.build("datamodule", benchmark, opts, seed=0)
    dm.setup()
    return dm
