"""NLVR2 fixture files in the published format (JSON lines with every published field, images
in ViLT's layout, one JPEG behind a .png name), shared by the NLVR2 data-module tests, the
missing-inputs tests and the registry's data-module contract test."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from vlcompress import registry
from vlcompress.datamodules.nlvr2 import NLVR2DataModule

SENTENCES = [
    "There are two dogs in total.",
    "The left image shows a single bird.",
    "One image contains a red car.",
    "There are more cats in the right image than in the left image.",
    "The left image has exactly three bottles.",
    "A person is holding an umbrella.",
]
IMAGE_SIZES = [(64, 48), (48, 64), (80, 45), (50, 50), (30, 90), (96, 40), (40, 40)]
RULE = dict(shorter=32, longer=64, size_divisor=16)
# (split, set, pair, sentence ids, train directory)
PAIRS = [("train", 10, 0, (0, 1), 3), ("train", 10, 1, (0,), 3), ("train", 11, 2, (0, 1), 7),
         ("train", 12, 3, (0,), 7), ("train", 13, 0, (0, 1), 21), ("train", 13, 1, (0,), 21),
         ("dev", 850, 0, (0, 1), None), ("dev", 851, 2, (0,), None),
         ("test1", 0, 1, (0,), None), ("test1", 0, 3, (0, 1), None)]  # fmt: skip


def many_sets(sets_per_split: int = 12) -> list[tuple]:
    """:data:`PAIRS`-style rows for a larger fixture: per split ``sets_per_split`` image sets
    of two pairs with two statements each (set numbers repeat across splits, as NLVR2's do)."""
    return [
        (split, set_id, pair, (0, 1), set_id % 5 if split == "train" else None)
        for split in ("train", "dev", "test1")
        for set_id in range(sets_per_split)
        for pair in (0, 1)
    ]


def example(split: str, ident: str, sentence: str, label: bool, directory: int | None) -> dict:
    """One example with every field NLVR2 publishes (train adds directory)."""
    row = {
        "validation": {"61": str(label)}, "sentence": sentence,
        "left_url": f"https://example.org/{ident}-0.jpg", "writer": "61", "label": str(label),
        "right_url": f"https://example.org/{ident}-1.jpg", "synset": "beer bottle",
        "query": "some beer bottles38", "identifier": ident,
    }  # fmt: skip
    if directory is not None:
        row["directory"] = directory
    else:
        row["extra_validations"] = {"154": str(label), "139": str(label)}
    return row


def write_nlvr2(
    root: Path, train_folder: str = "images/train", pairs: list[tuple] | None = None
) -> dict:
    """``root/data/{train,dev,test1}.json`` and ``root/images`` in ViLT's layout, of ``pairs``
    (default :data:`PAIRS`)."""
    rng = np.random.default_rng(0)
    pick = random.Random(0)
    rows: dict[str, list[dict]] = {"train": [], "dev": [], "test1": []}
    k = 0
    for split, set_id, pair, sentence_ids, directory in PAIRS if pairs is None else pairs:
        stem = f"{split}-{set_id}-{pair}"
        folder = root / "images" / (f"{train_folder}/{directory}" if split == "train" else split)
        folder.mkdir(parents=True, exist_ok=True)
        for side in (0, 1):
            w, h = IMAGE_SIZES[(k + side) % len(IMAGE_SIZES)]
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
            # "not all images are actually PNGs": one JPEG behind a .png name
            image.save(folder / f"{stem}-img{side}.png", format="JPEG" if k == 2 else "PNG")
        for s in sentence_ids:
            rows[split].append(example(split, f"{stem}-{s}", pick.choice(SENTENCES), bool(k % 2),
                                       directory))  # fmt: skip
            k += 1
    (root / "data").mkdir(parents=True, exist_ok=True)
    for split, part in rows.items():
        (root / "data" / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in part))
    return rows


def make(root: Path, cache: Path, **options) -> NLVR2DataModule:
    opts = dict(data_dir=str(root / "data"), image_dir=str(root / "images"),
                cache_dir=str(cache), question_type_min_count=2, batch_size=4,
                eval_batch_size=8) | RULE | options  # fmt: skip
    return registry.build("datamodule", "nlvr2", opts, seed=0)
