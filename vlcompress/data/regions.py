"""Region features: LXMERT's obj36 TSV reader and the memory-mapped region store.

LXMERT publishes bottom-up-attention Faster R-CNN features (36 regions per COCO image) as
tab-separated files without a header, one image per line, fields
``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes,
features``; the six array fields are base64 of raw little-endian numpy buffers (ids
``int64``, confidences ``float32``, ``boxes`` ``(num_boxes, 4)`` ``float32`` ``x1, y1, x2, y2``
in pixels, ``features`` ``(num_boxes, D)`` ``float32``, D = 2048). Rows are split on tabs
directly (no ``csv`` module, so no ``csv.field_size_limit`` to raise) and every field is
checked, so a damaged row is reported with its file, line and field.

:func:`convert_obj36` converts such files once (``python -m vlcompress prepare ...``) into a
:class:`RegionStore`, a folder that training reads through memory maps (CLIP grid features of
images go into the same layout: :func:`vlcompress.data.clip_grid.convert_clip_grid`):

* ``features.npy`` ``(num_images, max_boxes, D)`` ``float16`` or ``float32``;
* ``boxes.npy`` ``(num_images, max_boxes, 4)`` ``float32``, ``x1, y1, x2, y2`` divided by the
  image width / height and clipped to ``[0, 1]`` (as LXMERT normalises them);
* ``num_boxes.npy`` ``(num_images,)`` ``int32`` (rows past it are zeros);
* ``image_size.npy`` ``(num_images, 2)`` ``int32`` ``(height, width)``;
* ``image_ids.json`` (row order) and ``regions.json`` (the manifest, written last).

The conversion is atomic and resumable: it writes into ``<out>.partial/``, commits a chunk of
rows at a time (data synced first, then ``progress.json`` with each chunk's CRC-32 and the
source position after it), and on a rerun verifies every committed chunk, drops anything after
the last good one and continues from there. The finished folder is renamed to ``<out>`` in one
step, so ``<out>`` never holds a partial store.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlcompress.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "OBJ36_FIELDS",
    "RegionFileError",
    "RegionRecord",
    "RegionStore",
    "convert_obj36",
    "parse_obj36_line",
    "read_obj36_tsv",
    "store_problem",
]

OBJ36_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
)  # fmt: skip
"""The columns of an obj36 TSV row, in order."""

_ARRAY_FIELDS: dict[str, tuple[type, int | None]] = {
    "objects_id": (np.int64, 1),
    "objects_conf": (np.float32, 1),
    "attrs_id": (np.int64, 1),
    "attrs_conf": (np.float32, 1),
    "boxes": (np.float32, 4),
    "features": (np.float32, None),  # None: the feature size, inferred
}
MANIFEST = "regions.json"
PROGRESS = "progress.json"
IMAGE_IDS = "image_ids.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")
_ARRAYS = ("features", "boxes", "num_boxes", "image_size")
_CORRUPT_FIX = (
    "The file is damaged (a truncated download or a bad copy): fetch it again (LXMERT's "
    "data/mscoco_imgfeat/*_obj36.zip) and rerun the same prepare command, or delete that line "
    "to leave the image out."
)


class RegionFileError(ValueError):
    """A row of a region-feature TSV that cannot be read: names the file, line and field.

    Attributes:
        path: the TSV file.
        line: 1-based line number.
        field: the offending column (one of :data:`OBJ36_FIELDS`, or ``"row"``).
    """

    def __init__(self, path: str | os.PathLike, line: int, field: str, problem: str, fix: str):
        self.path, self.line, self.field = str(path), line, field
        super().__init__(f"{self.path}, line {line}, field {field!r}: {problem}. {fix}")


@dataclass(frozen=True)
class RegionRecord:
    """One image of an obj36 TSV.

    Attributes:
        image_id: e.g. ``COCO_val2014_000000393243``.
        height, width: image size in pixels.
        boxes: ``(num_boxes, 4)`` ``float32`` ``x1, y1, x2, y2`` in pixels.
        features: ``(num_boxes, D)`` ``float32``.
    """

    image_id: str
    height: int
    width: int
    boxes: np.ndarray
    features: np.ndarray

    def normalised_boxes(self) -> np.ndarray:
        """Boxes divided by ``(width, height, width, height)``, clipped to ``[0, 1]``."""
        scale = np.array([self.width, self.height, self.width, self.height], np.float32)
        return np.clip(self.boxes / scale, 0.0, 1.0)


def _positive_int(raw: bytes, path: Path, line: int, field: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise RegionFileError(
            path, line, field, f"expected a positive integer, got {raw[:40]!r}", _CORRUPT_FIX
        )
    return value


def parse_obj36_line(raw: bytes, path: str | os.PathLike, line: int) -> RegionRecord:
    """Decode and check one obj36 TSV line (the trailing newline may be present).

    Args:
        raw: the line's bytes.
        path, line: where it comes from (for error messages).

    Raises:
        RegionFileError: for a wrong column count, a bad integer, bad base64, or an array whose
            byte length does not match ``num_boxes``.
    """
    path = Path(path)
    cols = raw.rstrip(b"\r\n").split(b"\t")
    if len(cols) != len(OBJ36_FIELDS):
        raise RegionFileError(
            path, line, "row",
            f"{len(cols)} tab-separated columns, expected {len(OBJ36_FIELDS)} "
            f"({', '.join(OBJ36_FIELDS)})", _CORRUPT_FIX,
        )  # fmt: skip
    row = dict(zip(OBJ36_FIELDS, cols))
    try:
        image_id = row["img_id"].decode("ascii")
    except UnicodeDecodeError:
        image_id = ""
    if not image_id:
        raise RegionFileError(path, line, "img_id", "empty or not ASCII", _CORRUPT_FIX)
    height = _positive_int(row["img_h"], path, line, "img_h")
    width = _positive_int(row["img_w"], path, line, "img_w")
    n = _positive_int(row["num_boxes"], path, line, "num_boxes")
    arrays = {}
    for name, (dtype, cols_per_box) in _ARRAY_FIELDS.items():
        try:
            buf = base64.b64decode(row[name], validate=True)
        except (binascii.Error, ValueError) as e:
            raise RegionFileError(path, line, name, f"not valid base64 ({e})", _CORRUPT_FIX) from e
        item = np.dtype(dtype).itemsize
        if cols_per_box is None:  # features: any whole number of values per region
            ok = len(buf) > 0 and len(buf) % (n * item) == 0
            shape = f"({n}, D)"
        else:
            ok = len(buf) == n * cols_per_box * item
            shape = f"({n}, {cols_per_box})" if cols_per_box > 1 else f"({n},)"
        if not ok:
            raise RegionFileError(
                path, line, name,
                f"{len(buf)} bytes decoded, expected {np.dtype(dtype).name} values of shape "
                f"{shape} for num_boxes={n}", _CORRUPT_FIX,
            )  # fmt: skip
        arrays[name] = np.frombuffer(buf, dtype=np.dtype(dtype).newbyteorder("<"))
    boxes = arrays["boxes"].reshape(n, 4).astype(np.float32)
    features = arrays["features"].reshape(n, -1).astype(np.float32)
    if not (np.isfinite(boxes).all() and np.isfinite(features).all()):
        raise RegionFileError(
            path, line, "features" if np.isfinite(boxes).all() else "boxes",
            "holds NaN or infinite values", _CORRUPT_FIX,
        )  # fmt: skip
    return RegionRecord(image_id, height, width, boxes, features)


def read_obj36_tsv(
    path: str | os.PathLike, offset: int = 0, first_line: int = 1
) -> Iterator[tuple[RegionRecord, int, int]]:
    """Iterate over an obj36 TSV, one checked record per line (blank lines are skipped).

    Args:
        path: the TSV file.
        offset: byte offset to start from (a line start, from an earlier iteration).
        first_line: the line number at ``offset``.

    Yields:
        ``(record, offset_after_line, line_number)``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        RegionFileError: for a damaged row (see :func:`parse_obj36_line`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"region feature file {str(path)!r} does not exist")
    line = first_line
    with path.open("rb") as f:
        f.seek(offset)
        for raw in f:
            offset += len(raw)
            if raw.strip():
                yield parse_obj36_line(raw, path, line), offset, line
            line += 1


# ---------------------------------------------------------------------------------- the store
def _row_specs(max_boxes: int, dim: int, dtype: str) -> dict[str, tuple[np.dtype, tuple]]:
    """Per-row dtype and shape of each array of a store."""
    return {
        "features": (np.dtype(dtype).newbyteorder("<"), (max_boxes, dim)),
        "boxes": (np.dtype("<f4"), (max_boxes, 4)),
        "num_boxes": (np.dtype("<i4"), ()),
        "image_size": (np.dtype("<i4"), (2,)),
    }


def _npy_header(dtype: np.dtype, shape: tuple) -> bytes:
    """The ``.npy`` header for ``shape``; numpy pads it so the first axis can grow in place."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf,
        {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape},
    )
    return buf.getvalue()


def store_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a finished region store, or ``None`` when it is one (existence
    checks only: nothing is read, so it is cheap enough for configuration validation).

    Returns:
        A phrase to follow the path (``"does not exist"``, ``"holds no region store ..."``,
        ``"is unfinished ..."``), or ``None`` when the manifest is there.
    """
    path = Path(path)
    if (path / MANIFEST).is_file():
        return None
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        return (
            f"is unfinished: a conversion was started in {str(partial)!r}; rerun the same "
            "prepare command to continue it"
        )
    if not path.exists():
        return "does not exist"
    return (
        f"holds no region store (a store has {MANIFEST}, "
        f"{', '.join(a + '.npy' for a in _ARRAYS)} and {IMAGE_IDS})"
    )


class RegionStore:
    """A converted region-feature folder, read through memory maps (see the module docstring).

    Args:
        path: the folder written by :func:`convert_obj36`.

    Raises:
        FileNotFoundError: when the folder is not a finished store (with the command that makes
            one).
        ValueError: when a file's size differs from the manifest's (damaged store).

    Example::

        store = RegionStore("data/vqa/regions_obj36")
        feats, boxes, mask = store.batch(store.rows(["COCO_val2014_000000393243"]))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest = self.path / MANIFEST
        problem = store_problem(self.path)
        if problem is not None:
            raise FileNotFoundError(
                f"region store {str(self.path)!r} {problem}. Convert LXMERT's obj36 TSV files "
                "once with `python -m vlcompress prepare <benchmark> --tsv "
                f"<train2014_obj36.tsv> <val2014_obj36.tsv> --out {self.path}`; CLIP grid "
                "features of the COCO images (CLIP-ViL) with `python -m vlcompress prepare "
                f"clip-grid --images <train2014> <val2014> --checkpoint RN50.pt --out {self.path}`."
            )
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        m = self.manifest
        for name, size in m["bytes"].items():
            actual = (self.path / name).stat().st_size if (self.path / name).is_file() else None
            if actual != size:
                raise ValueError(
                    f"region store {str(self.path)!r} is damaged: {name} has {actual} bytes, its "
                    f"manifest says {size}. Delete the folder and run the prepare command again."
                )
        self.image_ids: list[str] = json.loads((self.path / IMAGE_IDS).read_text())
        self.index = {name: i for i, name in enumerate(self.image_ids)}
        self.max_boxes, self.feature_dim = int(m["max_boxes"]), int(m["feature_dim"])
        self._arrays: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = None  # memory maps are reopened in each process, never pickled
        return state

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """The memory-mapped arrays (``features``, ``boxes``, ``num_boxes``, ``image_size``)."""
        if self._arrays is None:
            self._arrays = {
                a: np.load(self.path / f"{a}.npy", mmap_mode="r", allow_pickle=False)
                for a in _ARRAYS
            }
        return self._arrays

    def missing(self, image_ids: Sequence[str]) -> list[str]:
        """The ids among ``image_ids`` the store has no features for (in order, unique)."""
        return list(dict.fromkeys(i for i in image_ids if i not in self.index))

    def rows(self, image_ids: Sequence[str]) -> np.ndarray:
        """Store rows of ``image_ids``.

        Raises:
            KeyError: naming the first image the store lacks.
        """
        try:
            return np.fromiter((self.index[i] for i in image_ids), np.int64, len(image_ids))
        except KeyError as e:
            raise KeyError(f"region store {str(self.path)!r} has no image {e.args[0]!r}") from None

    def batch(self, rows: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, ...]:
        """Features ``(B, M, D)`` float32, boxes ``(B, M, 4)`` float32 and the region mask
        ``(B, M)`` bool (True where a real region is) of store ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        a = self.arrays
        feats = torch.from_numpy(np.asarray(a["features"][rows], dtype=np.float32))
        boxes = torch.from_numpy(np.array(a["boxes"][rows], dtype=np.float32))
        n = torch.from_numpy(np.array(a["num_boxes"][rows], dtype=np.int64))
        mask = torch.arange(self.max_boxes)[None, :] < n[:, None]
        return feats, boxes, mask


# ---------------------------------------------------------------------------------- conversion
def _sources(tsv_paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    missing = [str(p) for p in tsv_paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"region feature file(s) not found: {missing}. Give LXMERT's obj36 TSV files "
            "(e.g. data/mscoco_imgfeat/train2014_obj36.tsv and val2014_obj36.tsv, unzipped)."
        )
    if not tsv_paths:
        raise ValueError("convert_obj36 needs at least one TSV file (--tsv <files...>).")
    return [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size} for p in tsv_paths]


class _PartialStore:
    """The files of an unfinished conversion in ``<out>.partial/`` (one append-only file per
    array, a ``.npy`` header reserved at its start; image ids one per line)."""

    def __init__(self, folder: Path, settings: dict[str, Any]) -> None:
        self.folder, self.settings = folder, settings
        self.chunks: list[dict[str, Any]] = []
        self.specs: dict[str, tuple[np.dtype, tuple]] | None = None
        self.header_bytes: dict[str, int] = {}

    # -- layout
    def _part(self, name: str) -> Path:
        return self.folder / f"{name}.npy.part"

    @property
    def ids_path(self) -> Path:
        """Image ids written so far, one per line."""
        return self.folder / "image_ids.txt.part"

    def set_dim(self, dim: int) -> None:
        """Fix the feature size (from the first record) and the per-row layout."""
        self.settings["feature_dim"] = dim
        self.specs = _row_specs(self.settings["max_boxes"], dim, self.settings["dtype"])
        self.header_bytes = {
            a: len(_npy_header(dt, (0, *shp))) for a, (dt, shp) in self.specs.items()
        }

    def row_bytes(self, name: str) -> int:
        """Bytes per image of array ``name``."""
        dtype, shape = self.specs[name]
        return dtype.itemsize * int(np.prod(shape, dtype=np.int64))

    @property
    def rows(self) -> int:
        """Images committed so far."""
        return sum(c["rows"] for c in self.chunks)

    # -- progress
    def save_progress(self) -> None:
        """Record the committed chunks (after their data is on disk)."""
        atomic_write_json(self.folder / PROGRESS, {**self.settings, "chunks": self.chunks})

    def commit(self, records: list[RegionRecord], end: list[int]) -> None:
        """Append ``records`` to the files, sync them, then record the chunk."""
        m = self.settings["max_boxes"]
        b = len(records)
        feats = np.zeros((b, *self.specs["features"][1]), self.specs["features"][0])
        boxes = np.zeros((b, m, 4), np.float32)
        for i, r in enumerate(records):
            feats[i, : len(r.features)] = r.features
            boxes[i, : len(r.boxes)] = r.normalised_boxes()
        data = {
            "features": feats,
            "boxes": boxes,
            "num_boxes": np.array([len(r.boxes) for r in records], "<i4"),
            "image_size": np.array([[r.height, r.width] for r in records], "<i4"),
        }
        crc = {}
        for name, arr in data.items():
            path = self._part(name)
            if not path.exists():
                path.write_bytes(b"\0" * self.header_bytes[name])
            raw = np.ascontiguousarray(arr, dtype=self.specs[name][0]).tobytes()
            crc[name] = zlib.crc32(raw)
            with path.open("ab") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        ids = "".join(r.image_id + "\n" for r in records).encode()
        crc["image_ids"] = zlib.crc32(ids)
        with self.ids_path.open("ab") as f:
            f.write(ids)
            f.flush()
            os.fsync(f.fileno())
        self.chunks.append({"rows": b, "end": end, "crc": crc})
        self.save_progress()

    # -- resume
    def verify(self) -> tuple[int, list[str]]:
        """Check every committed chunk's CRC-32; keep the chunks before the first bad one,
        truncate the files after them. Returns ``(dropped chunks, image ids kept)``."""
        good: list[dict[str, Any]] = []
        handles = {a: self._part(a).open("rb") if self._part(a).exists() else None for a in _ARRAYS}
        ids_raw = self.ids_path.read_bytes() if self.ids_path.exists() else b""
        id_lines = ids_raw.splitlines(keepends=True)
        try:
            for a, h in handles.items():
                if h is not None:
                    h.seek(self.header_bytes[a])
            row = 0
            for chunk in self.chunks:
                ok = True
                for a, h in handles.items():
                    want = chunk["rows"] * self.row_bytes(a)
                    got = h.read(want) if h is not None else b""
                    ok = ok and len(got) == want and zlib.crc32(got) == chunk["crc"][a]
                ids = b"".join(id_lines[row : row + chunk["rows"]])
                ok = ok and zlib.crc32(ids) == chunk["crc"]["image_ids"]
                if not ok:
                    break
                good.append(chunk)
                row += chunk["rows"]
        finally:
            for h in handles.values():
                if h is not None:
                    h.close()
        dropped = len(self.chunks) - len(good)
        self.chunks = good
        for a in _ARRAYS:
            if self._part(a).exists():
                os.truncate(self._part(a), self.header_bytes[a] + self.rows * self.row_bytes(a))
        kept = [x.decode().rstrip("\n") for x in id_lines[: self.rows]]
        atomic_write_text(self.ids_path, "".join(i + "\n" for i in kept))
        self.save_progress()
        return dropped, kept

    # -- finish
    def finish(self, image_ids: list[str]) -> dict[str, Any]:
        """Write the final headers, rename the parts, write ids and the manifest."""
        n = self.rows
        sizes = {}
        for a, (dtype, shape) in self.specs.items():
            header = _npy_header(dtype, (n, *shape))
            if len(header) != self.header_bytes[a]:  # numpy pads headers for in-place growth
                raise RuntimeError(f"{a}.npy header changed size ({len(header)} bytes)")
            with self._part(a).open("r+b") as f:
                f.write(header)
                f.flush()
                os.fsync(f.fileno())
            final = self.folder / f"{a}.npy"
            os.replace(self._part(a), final)
            sizes[final.name] = final.stat().st_size
        atomic_write_text(self.folder / IMAGE_IDS, json.dumps(image_ids))
        sizes[IMAGE_IDS] = (self.folder / IMAGE_IDS).stat().st_size
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.settings.get("kind", "obj36"),
            "num_images": n,
            "max_boxes": self.settings["max_boxes"],
            "feature_dim": self.settings["feature_dim"],
            "dtype": self.settings["dtype"],
            "sources": self.settings["sources"],
            "bytes": sizes,
        }
        atomic_write_json(self.folder / MANIFEST, manifest)
        self.ids_path.unlink(missing_ok=True)
        (self.folder / PROGRESS).unlink(missing_ok=True)
        return manifest


def _same_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences between two conversions' settings (sources, dtype, max_boxes)."""
    return [
        f"{k}: {old.get(k)!r} then, {new[k]!r} now"
        for k in ("sources", "dtype", "max_boxes")
        if old.get(k) != new[k]
    ]


def convert_obj36(
    tsv_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    dtype: str = "float16",
    max_boxes: int = 36,
    chunk_rows: int = 128,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Convert obj36 TSV files into a :class:`RegionStore` at ``out`` (resumable, atomic).

    Args:
        tsv_paths: LXMERT obj36 TSV files (e.g. ``train2014_obj36.tsv``, ``val2014_obj36.tsv``).
        out: the store folder to create (must not exist, or be empty).
        dtype: ``float16`` (half the disk, the default) or ``float32`` for the features.
        max_boxes: regions kept per image (rows with fewer are zero-padded and masked).
        chunk_rows: images committed at a time (the most a crash can lose).
        progress: show a rich progress bar (bytes read).
        after_chunk: called with the number of images committed after each chunk (tests use
            it to interrupt a conversion).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: for a missing TSV file.
        FileExistsError: when ``out`` already holds something else than this conversion.
        RegionFileError: for a damaged row (file, line, field and fix).
        ValueError: for bad arguments, a duplicate image id, a row with more than
            ``max_boxes`` regions, or a feature size that changes between rows.

    Example::

        convert_obj36(["train2014_obj36.tsv", "val2014_obj36.tsv"], "data/vqa/regions_obj36")
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if max_boxes < 1 or chunk_rows < 1:
        raise ValueError(f"max_boxes and chunk_rows must be >= 1, got {max_boxes}, {chunk_rows}")
    out = Path(out)
    settings = {
        "format_version": FORMAT_VERSION,
        "kind": "obj36",
        "sources": _sources(tsv_paths),
        "dtype": dtype,
        "max_boxes": max_boxes,
        "feature_dim": None,
    }
    begun = _begin_conversion(out, settings, "--tsv/--dtype/--max-boxes")
    if begun is None:
        return out
    store, image_ids = begun
    seen = {name: None for name in image_ids}
    start = store.chunks[-1]["end"] if store.chunks else [0, 0, 1]
    _run_conversion(
        store, settings["sources"], start, image_ids, seen, chunk_rows, progress, after_chunk
    )
    _finish_conversion(store, out, image_ids)
    return out


def _begin_conversion(
    out: Path, settings: dict[str, Any], flags: str
) -> tuple[_PartialStore, list[str]] | None:
    """Set up, or resume, a conversion into ``<out>.partial`` (shared by the converters).

    Args:
        out: the final store folder.
        settings: the conversion's settings (``sources``, ``dtype``, ``max_boxes``, ...);
            a resume must have the same ones.
        flags: the command-line options that set them (for messages).

    Returns:
        ``None`` when ``out`` already holds this conversion's finished store; else the partial
        store (its committed chunks verified) and the image ids committed so far.

    Raises:
        FileExistsError: when ``out`` holds something else.
        ValueError: when ``<out>.partial`` holds a conversion of other inputs.
    """
    if out.exists() and any(out.iterdir()):
        done = out / MANIFEST
        if done.is_file() and not _same_inputs(json.loads(done.read_text()), settings):
            log.info("region store %s is already converted from these inputs", out)
            return None
        raise FileExistsError(
            f"{str(out)!r} already exists and is not this conversion's store; choose another "
            "--out, or delete it to convert again."
        )
    partial = out.with_name(out.name + ".partial")
    store = _PartialStore(partial, settings)
    image_ids: list[str] = []
    old = json.loads((partial / PROGRESS).read_text()) if (partial / PROGRESS).is_file() else None
    diff = _same_inputs(old, settings) if old is not None else []
    if diff:
        raise ValueError(
            f"{str(partial)!r} holds an unfinished conversion of other inputs "
            f"({'; '.join(diff)}). Rerun with the same {flags} to continue it, "
            "or delete that folder to start over."
        )
    if old is not None and old.get("feature_dim") and old["chunks"]:
        store.chunks = old["chunks"]
        store.set_dim(int(old["feature_dim"]))
        dropped, image_ids = store.verify()
        if dropped:
            log.warning(
                "%d unverifiable chunk(s) of %s dropped; converting again", dropped, partial
            )
        log.info("resuming the conversion into %s at image %d", partial, store.rows)
    else:  # nothing committed yet (or killed during the first chunk): start afresh
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        store.save_progress()
    return store, image_ids


def _finish_conversion(store: _PartialStore, out: Path, image_ids: list[str]) -> dict[str, Any]:
    """Finish ``store`` (headers, ids, manifest) and rename it to ``out``; returns the
    manifest."""
    manifest = store.finish(image_ids)
    if out.exists():
        out.rmdir()  # empty (checked by _begin_conversion)
    os.replace(store.folder, out)
    log.info(
        "region store %s: %d images, %d x %d %s features",
        out, manifest["num_images"], manifest["max_boxes"], manifest["feature_dim"],
        manifest["dtype"],
    )  # fmt: skip
    return manifest


def _run_conversion(
    store: _PartialStore,
    sources: list[dict[str, Any]],
    start: list[int],
    image_ids: list[str],
    seen: dict[str, Any],
    chunk_rows: int,
    progress: bool,
    after_chunk: Callable[[int], None] | None,
) -> None:
    """Read the TSV files from ``start`` = ``[file index, byte offset, line]`` and commit
    chunks of ``chunk_rows`` images."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    total = sum(s["bytes"] for s in sources)
    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with Progress(*columns, disable=not progress, transient=False) as bar:
        before = sum(s["bytes"] for s in sources[: start[0]])  # bytes of the files before this
        task = bar.add_task("converting region features", total=total, completed=before + start[1])
        for fi in range(start[0], len(sources)):
            path = sources[fi]["path"]
            offset, line = (start[1], start[2]) if fi == start[0] else (0, 1)
            bar.update(task, description=f"converting {Path(path).name}")
            pending: list[RegionRecord] = []
            for record, end, lineno in read_obj36_tsv(path, offset, line):
                _check_record(store, record, seen, path, lineno)
                pending.append(record)
                image_ids.append(record.image_id)
                if len(pending) == chunk_rows:
                    store.commit(pending, [fi, end, lineno + 1])
                    bar.update(task, completed=before + end)
                    pending = []
                    if after_chunk is not None:
                        after_chunk(store.rows)
            if pending:
                store.commit(pending, [fi + 1, 0, 1])
                if after_chunk is not None:
                    after_chunk(store.rows)
            before += sources[fi]["bytes"]
            bar.update(task, completed=before)


def _check_record(
    store: _PartialStore, record: RegionRecord, seen: dict[str, Any], path: str, line: int
) -> None:
    """Feature size, region count and uniqueness of one record (the first sets the size)."""
    if store.specs is None:
        store.set_dim(record.features.shape[1])
    dim, m = store.settings["feature_dim"], store.settings["max_boxes"]
    if record.features.shape[1] != dim:
        raise RegionFileError(
            path, line, "features",
            f"{record.features.shape[1]} values per region, the earlier rows have {dim}",
            "Every file of one store must come from the same extractor; convert them separately.",
        )  # fmt: skip
    if len(record.boxes) > m:
        raise RegionFileError(
            path, line, "num_boxes", f"{len(record.boxes)} regions, more than max_boxes={m}",
            f"Rerun prepare with --max-boxes {len(record.boxes)} (or larger).",
        )  # fmt: skip
    if record.image_id in seen:
        where = seen[record.image_id] or "an earlier row"
        raise ValueError(
            f"{path}, line {line}: image {record.image_id!r} appears twice (also at {where}). "
            "Give each TSV file once; a file with overlapping images must go to its own store."
        )
    seen[record.image_id] = f"{path}, line {line}"
