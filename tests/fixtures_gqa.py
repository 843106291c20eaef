"""GQA fixture files in the published formats (balanced 1.2 questions, LXMERT's obj36 TSVs),
shared by the GQA data-module tests and the registry's data-module contract test."""

from __future__ import annotations

import json
from pathlib import Path

from fixtures_vqa import image_regions, obj36_row

from vlcompress import registry
from vlcompress.cli import main as cli_main

DIM = 32  # region feature size of the fixture (LXMERT's is 2048)
FILES = {
    "train": "train_balanced_questions.json",
    "val": "val_balanced_questions.json",
    "test": "testdev_balanced_questions.json",
}
IMAGES = {  # imageId -> (height, width, regions): GQA's ids are strings, testdev's start with n
    "2375429": (500, 333, 36),
    "2417468": (375, 500, 36),
    "2354786": (333, 500, 36),
    "2368310": (480, 640, 10),  # fewer regions than max_boxes: padded and masked
    "n161313": (427, 640, 36),
    "n435808": (640, 480, 36),
}
TESTDEV_IMAGES = ("n161313", "n435808")
QUESTIONS = {  # part -> [(questionId, imageId, question, answer, structural, semantic, detailed)]
    "train": [
        ("02930152", "2375429", "Is the sky dark?", "yes", "verify", "attr", "verifyAttr"),
        ("07333408", "2375429", "What is on the white wall?", "pipe", "query", "rel", "relS"),
        ("07333405", "2375429", "Is the pipe made of metal or wood?", "metal", "choose", "attr",
         "chooseAttr"),
        ("201307251", "2375429", "Is the wall white?", "yes", "verify", "attr", "verifyAttr"),
        ("15736264", "2417468", "Is there a man to the left of the car?", "no", "verify", "rel",
         "existRelS"),
        ("15736265", "2417468", "Is the car red?", "no", "verify", "attr", "verifyAttr"),
        ("15736266", "2417468", "Are there both cars and trucks in the picture?", "yes",
         "logical", "obj", "existAnd"),
        ("20968379", "2354786", "What is the animal that is on the grass?", "dog", "query", "rel",
         "relS"),
        ("20968380", "2354786", "Are the dog and the cat the same color?", "no", "compare",
         "attr", "twoSame"),
        ("20968381", "2354786", "What is the man wearing?", "t-shirt", "query", "rel", "relS"),
    ],
    "val": [
        ("11429113", "2368310", "Is the table wooden?", "yes", "verify", "attr", "verifyAttr"),
        ("11429114", "2368310", "What is on the table?", "laptop", "query", "rel", "relS"),
        ("11429115", "2368310", "Which color is the laptop, black or silver?", "silver", "choose",
         "attr", "chooseAttr"),
    ],
    "test": [
        ("201640614", "n161313", "Is the bag black?", "no", "verify", "attr", "verifyAttr"),
        ("201640615", "n161313", "What is the man holding?", "umbrella", "query", "rel", "relS"),
        ("201640616", "n435808", "What animal is on the grass?", "dog", "query", "rel", "relS"),
    ],
}  # fmt: skip
# train answers: yes 3, no 3, then dog, metal, pipe, t-shirt once each; laptop, silver (val) and
# umbrella (testdev) are not training answers


def gqa_entry(qid: str, image: str, question: str, answer: str, structural: str,
              semantic: str, detailed: str) -> dict:  # fmt: skip
    """One question in the published format (every field of GQA 1.2, with plausible values)."""
    return {
        "semantic": [
            {"operation": "select", "dependencies": [], "argument": "object (722332)"},
            {
                "operation": "query" if structural == "query" else structural,
                "dependencies": [0],
                "argument": "name",
            },
        ],  # fmt: skip
        "entailed": [],
        "equivalent": [qid],
        "question": question,
        "imageId": image,
        "isBalanced": True,
        "groups": {"global": answer if structural == "query" else None, "local": f"14-{detailed}"},
        "answer": answer,
        "semanticStr": "select: object (722332)->query: name [0]",
        "annotations": {"answer": {}, "question": {"2": "722332"}, "fullAnswer": {"1": "722332"}},
        "types": {"semantic": semantic, "structural": structural, "detailed": detailed},
        "fullAnswer": f"The answer is {answer}.",
    }


def write_questions(folder: Path, labelled_test: bool = True) -> None:
    """The three balanced question files; an unlabelled testdev lacks answer and fullAnswer."""
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in QUESTIONS.items():
        data = {r[0]: gqa_entry(*r) for r in rows}
        if part == "test" and not labelled_test:
            for q in data.values():
                del q["answer"], q["fullAnswer"]
        (folder / FILES[part]).write_text(json.dumps(data))


def write_feature_tsvs(folder: Path) -> tuple[list[Path], dict[str, dict]]:
    """LXMERT's two GQA feature files: ``vg_gqa_obj36.tsv`` (train and val images) and
    ``gqa_testdev_obj36.tsv``; returns the paths and each image's pixel boxes and features."""
    folder.mkdir(parents=True, exist_ok=True)
    regions, paths = {}, []
    for name, images in (
        ("vg_gqa_obj36.tsv", [i for i in IMAGES if i not in TESTDEV_IMAGES]),
        ("gqa_testdev_obj36.tsv", list(TESTDEV_IMAGES)),
    ):
        path = folder / name
        with path.open("w") as f:
            for img in images:
                h, w, n = IMAGES[img]
                r = regions[img] = image_regions(img, h, w, num_boxes=n, dim=DIM)
                f.write(obj36_row(img, h, w, r["boxes"], r["features"]))
        paths.append(path)
    return paths, regions


def build(data_dir: Path, regions_dir: Path | None = None, **options):
    """A (not yet set up) ``gqa`` module on ``data_dir``."""
    opts = {"data_dir": str(data_dir), "batch_size": 4, "eval_batch_size": 8} | options
    if regions_dir is not None:
        opts["regions_dir"] = str(regions_dir)
    return registry.build("datamodule", "gqa", opts, seed=0)


def prepare_gqa(root: Path) -> dict:
    """A data folder with the question files and a region store converted by the CLI."""
    write_questions(root)
    tsv, regions = write_feature_tsvs(root / "tsv")
    out = root / "regions_obj36"
    args = ["prepare", "gqa", "--tsv", *map(str, tsv), "--out", str(out), "--dtype", "float32"]
    assert cli_main(args) == 0
    return {"data_dir": root, "regions_dir": out, "regions": regions}
