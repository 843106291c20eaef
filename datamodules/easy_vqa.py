"""easy-VQA (the real data of the ``easy-vqa`` package) as a LightningDataModule.

Two splits:

* ``standard`` — the package's own train / test questions (a validation set is carved from
  train);
* ``cp`` — a VQA-CP-style re-split, built as VQA-CP v2 was built from VQA v2: all questions are
  pooled, grouped by question type (its leading words) and answer, and whole (type, answer)
  groups are assigned to test until the type's test share reaches ``cp_test_fraction``, so that
  per question type the train and test answer distributions differ strongly. Deterministic by
  ``seed``.

Images are decoded once into a ``uint8`` cache (``.npy``) and served from memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vlcompress.data import AnswerVocab, VLBatch, WordVocab, tokenize
from vlcompress.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

SPLITS = ("standard", "cp")
YES_NO = frozenset({"yes", "no"})
NUM_ANNOTATORS = 10


def default_data_dir() -> Path:
    """The ``data/`` folder shipped inside the installed ``easy-vqa`` package."""
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise FileNotFoundError(
            "easy-VQA data not found: the `easy-vqa` package is not installed. "
            "Install it with `pip install easy-vqa` (make train/make test do), or set "
            "data.data_dir to a folder holding answers.txt, train/ and test/."
        ) from e
    return Path(easy_vqa.__file__).parent / "data"


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


def _distribution(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {k: v / total for k, v in counter.items()} if total else {}


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """Total-variation distance between two answer distributions (0 = same, 1 = disjoint)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


class _Split(Dataset):
    """In-memory split: tensors indexed a whole batch at a time (``__getitems__``)."""

    def __init__(self, dm: EasyVQADataModule, rows: np.ndarray) -> None:
        self.dm, self.rows = dm, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> VLBatch:
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> VLBatch:
        r = torch.as_tensor(self.rows[indices])
        dm = self.dm
        ids = dm._text_ids[r]
        pixels = dm._images[dm._image_index[r]].permute(0, 3, 1, 2).float().div_(255.0)
        answers = [dm._answers[i] for i in r.tolist()]
        return VLBatch(
            text_ids=ids,
            text_mask=ids != 0,
            visual=pixels,
            targets=dm._targets[r],
            question_id=r.clone(),
            question_type=[dm._qtypes[i] for i in r.tolist()],
            answer_type=[dm._atypes[i] for i in r.tolist()],
            answers=[[a] * NUM_ANNOTATORS for a in answers],
        )


def _identity(batch: VLBatch) -> VLBatch:
    return batch


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation derived from ``(seed, epoch)`` only.

    Lightning calls :meth:`set_epoch` before each epoch, so a run resumed from a checkpoint sees
    exactly the batches the uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class EasyVQADataModule(L.LightningDataModule):
    """easy-VQA: 64x64 images of one shape in one colour, 13 answers.

    Args:
        data_dir: folder with ``answers.txt``, ``{train,test}/questions.json`` and
            ``{train,test}/images/<id>.png``; default: the installed package's data.
        split: ``"standard"`` or ``"cp"`` (VQA-CP-style changing priors).
        val_fraction: share of the training questions held out for validation.
        cp_test_fraction: per question type, the share of questions the ``cp`` split moves to test.
        cp_leak: share of every (question type, answer) group that crosses to the other split,
            so each answer stays learnable for each type while the priors are reversed
            (0 = whole groups, as in VQA-CP; then a yes/no type's test answer never occurs
            with that type in training).
        seed: seed of every random choice (validation carve-out, ``cp`` assignment).
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        max_question_len: question tokens kept (MCAN uses 14).
        cache_dir: where decoded images are cached (default ``$VLCOMPRESS_CACHE`` or
            ``~/.cache/vlcompress``).
        num_workers: data-loader workers (0 is fastest: batches are tensor slices).

    Raises:
        ValueError: for a bad split name or fractions outside (0, 1).
        FileNotFoundError: when ``data_dir`` lacks the expected files.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        split: Literal["standard", "cp"] = "standard",
        val_fraction: float = 0.1,
        cp_test_fraction: float = 0.33,
        cp_leak: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        max_question_len: int = 14,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"easy-VQA split must be one of {SPLITS}, got {split!r}.")
        for name, v in (("val_fraction", val_fraction), ("cp_test_fraction", cp_test_fraction)):
            if not 0.0 < v < 1.0:
                raise ValueError(f"easy-VQA {name} must be in (0, 1), got {v}.")
        if not 0.0 <= cp_leak < 0.5:
            raise ValueError(f"easy-VQA cp_leak must be in [0, 0.5), got {cp_leak}.")
        self.cp_leak = cp_leak
        self.data_dir = Path(data_dir) if data_dir else None
        self.split = split
        self.val_fraction = val_fraction
        self.cp_test_fraction = cp_test_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_question_len = max_question_len
        self.cache_dir = Path(
            cache_dir or os.environ.get("VLCOMPRESS_CACHE", Path.home() / ".cache" / "vlcompress")
        )
        self.num_workers = num_workers
        self.split_report: dict[str, Any] = {}
        self._ready = False

    # ------------------------------------------------------------------ files
    @property
    def root(self) -> Path:
        """The data folder in use."""
        return self.data_dir if self.data_dir is not None else default_data_dir()

    def _check_files(self) -> None:
        root = self.root
        expected = [
            "answers.txt",
            "train/questions.json",
            "test/questions.json",
            "train/images/",
            "test/images/",
        ]
        missing = [e for e in expected if not (root / e).exists()]
        if missing:
            raise FileNotFoundError(
                f"easy-VQA data folder {str(root)!r} is missing {missing}. Expected "
                f"{expected} (images named <image_id>.png). The data ships with the `easy-vqa` "
                "package (`pip install easy-vqa`); leave data.data_dir unset to use it."
            )

    def _cache_path(self, part: str) -> Path:
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:10]
        return self.cache_dir / "easy_vqa" / f"{part}-images-{key}.npy"

    def _image_cache(self, part: str) -> Path:
        """Path of the ``uint8 (num_images, 64, 64, 3)`` cache of ``part``; the PNGs are
        decoded (once) and the cache written atomically when it is missing or stale."""
        path = self._cache_path(part)
        folder = self.root / part / "images"
        n = sum(1 for f in folder.iterdir() if f.suffix == ".png")
        if path.exists() and np.load(path, mmap_mode="r").shape[0] == n:  # header only
            return path
        from PIL import Image
        from rich.progress import track

        first = np.asarray(Image.open(folder / "0.png").convert("RGB"))
        arr = np.zeros((n, *first.shape), dtype=np.uint8)
        for i in track(range(n), description=f"decoding easy-VQA {part} images", transient=True):
            arr[i] = np.asarray(Image.open(folder / f"{i}.png").convert("RGB"))
        buf = io.BytesIO()
        np.save(buf, arr)
        atomic_write_bytes(path, buf.getvalue())
        log.info("cached %d decoded %s images at %s", n, part, path)
        return path

    def prepare_data(self) -> None:
        """Check the files and decode the images once (rank 0)."""
        self._check_files()
        for part in ("train", "test"):
            self._image_cache(part)

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
        n = len(questions)
        self._images = torch.from_numpy(np.concatenate(image_arrays))
        self._image_index = torch.tensor(images, dtype=torch.long)
        self._answers = answers
        self._qtypes = [question_type(q, content) for q in questions]
        self._atypes = [
            "yes/no" if a in YES_NO else ("number" if a.isdigit() else "other") for a in answers
        ]
        self.answer_vocab = AnswerVocab(answers_list)
        self._targets = self.answer_vocab.targets([[a] * NUM_ANNOTATORS for a in answers])
        parts_arr = np.array(parts)
        rng = random.Random(self.seed)
        if self.split == "standard":
            train_all = np.flatnonzero(parts_arr == "train")
            test = np.flatnonzero(parts_arr == "test")
        else:
            train_all, test = self._cp_split(n, rng)
        train_all = np.array(train_all)
        perm = np.array(rng.sample(range(len(train_all)), len(train_all)), dtype=np.int64)
        n_val = max(1, int(round(self.val_fraction * len(train_all))))
        val, train = np.sort(train_all[perm[:n_val]]), np.sort(train_all[perm[n_val:]])
        self.word_vocab = WordVocab.build(questions[i] for i in train)
        self._text_ids = self.word_vocab.encode(questions, self.max_question_len)
        self.index = {"train": train, "val": val, "test": np.sort(np.asarray(test))}
        self.question_types = sorted(set(self._qtypes))
        self.answer_types = ["yes/no", "number", "other"]
        self.split_report = self._report()
        log.info(
            "easy-VQA %s split: %d train / %d val / %d test questions; %d question types; "
            "mean per-type train-vs-test answer TV distance %.3f",
            self.split, len(train), len(val), len(test), len(self.question_types),
            self.split_report["mean_tv_distance"],
        )  # fmt: skip
        self._ready = True

    def _cp_split(self, n: int, rng: random.Random) -> tuple[list[int], list[int]]:
        groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i in range(n):
            groups[self._qtypes[i]][self._answers[i]].append(i)
        train, test = [], []
        chosen: dict[str, list[str]] = defaultdict(list)
        for qtype in sorted(groups):
            by_answer = groups[qtype]
            order = sorted(by_answer)
            rng.shuffle(order)
            total = sum(len(v) for v in by_answer.values())
            n_test = 0
            for k, ans in enumerate(order):
                last_left = k == len(order) - 1
                group = list(by_answer[ans])
                rng.shuffle(group)
                n_leak = int(round(self.cp_leak * len(group)))
                if n_test < self.cp_test_fraction * total and not last_left:
                    test.extend(group[n_leak:])
                    train.extend(group[:n_leak])
                    n_test += len(group)
                    chosen[qtype].append(ans)
                else:
                    train.extend(group[n_leak:])
                    test.extend(group[:n_leak])
        # As in VQA-CP: every answer tested must be learnable, so an answer no training
        # question has gets its smallest test group moved back to train.
        train_answers = {self._answers[i] for i in train}
        for ans in sorted({self._answers[i] for i in test} - train_answers):
            qtype = min((q for q in chosen if ans in chosen[q]), key=lambda q: len(groups[q][ans]))
            moved = set(groups[qtype][ans]) - set(train)
            test = [i for i in test if i not in moved]
            train.extend(moved)
        return sorted(train), sorted(test)

    def _report(self) -> dict[str, Any]:
        """Per question type: answer distributions of train and test, and their TV distance."""
        per_type: dict[str, Any] = {}
        for qt in self.question_types:
            dist = {}
            for part in ("train", "test"):
                c = Counter(self._answers[i] for i in self.index[part] if self._qtypes[i] == qt)
                dist[part] = _distribution(c)
            per_type[qt] = {
                "tv_distance": total_variation(dist["train"], dist["test"]),
                "train": dist["train"],
                "test": dist["test"],
            }
        tvs = [v["tv_distance"] for v in per_type.values()]
        return {
            "split": self.split,
            "sizes": {k: int(len(v)) for k, v in self.index.items()},
            "mean_tv_distance": float(np.mean(tvs)) if tvs else 0.0,
            "per_question_type": per_type,
        }

    # ------------------------------------------------------------------ loaders
    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        if not self._ready:
            self.setup()
        bs = self.batch_size if part == "train" else self.eval_batch_size
        rows = self.index[part]
        return DataLoader(
            _Split(self, rows),
            batch_size=bs,
            sampler=EpochShuffleSampler(len(rows), self.seed) if shuffle else None,
            collate_fn=_identity,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (carved from train)."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Test batches, for prediction."""
        return self._loader("test", shuffle=False)
