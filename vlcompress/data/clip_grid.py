"""CLIP grid features of images, computed once into a :class:`~vlcompress.data.regions.RegionStore`.

CLIP-ViL reads a frozen CLIP ResNet's grid features (``CLIPViL.grid_features``). On VQA v2 they
are computed once per COCO image (``python -m vlcompress prepare clip-grid ...``) and read like
region features: each image is one store row of ``rows * cols`` "regions" (the grid cells,
row-major, every one real), each with its cell's box (the cell's rectangle in the original
image, normalised by the store). The image id is the file stem (``COCO_train2014_000000000009``,
as :func:`vlcompress.data.vqa_files.coco_image_name` names the images of the questions).

The same path as the model: the trunk of
:func:`~vlcompress.encoders.clip_resnet.build_clip_resnet` with OpenAI's weights
(:func:`~vlcompress.encoders.clip_resnet.load_openai_clip_visual`), images resized and
normalised by :func:`~vlcompress.encoders.clip_resnet.clip_input`, eval mode, no gradients.
The conversion is atomic and resumable as :func:`~vlcompress.data.regions.convert_obj36`'s
(the same ``<out>.partial`` machinery); the resume position is the number of images committed
(the image list is sorted and fixed).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlcompress.data.regions import (
    DTYPES,
    FORMAT_VERSION,
    RegionRecord,
    _begin_conversion,
    _check_record,
    _finish_conversion,
    _PartialStore,
)
from vlcompress.encoders.clip_resnet import (
    CLIP_RESNETS,
    build_clip_resnet,
    clip_input,
    load_openai_clip_visual,
)

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "cell_boxes", "convert_clip_grid", "list_images", "load_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""The image files read (case-insensitive)."""

_BAD_IMAGE_FIX = (
    "Replace it with a good copy (extract it again from COCO's train2014.zip / val2014.zip) and "
    "rerun the same command to continue; removing it changes the image list, so the conversion "
    "then has to start over (delete the .partial folder)."
)


def list_images(image_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files (:data:`IMAGE_SUFFIXES`) of ``image_dirs``: folder by folder, in the
    given order, each folder's files sorted by name (not recursive).

    Raises:
        FileNotFoundError: for a missing folder.
        ValueError: for no folders, a folder without images, or two files of the same stem
            (image id).
    """
    if not image_dirs:
        raise ValueError("convert_clip_grid needs at least one image folder (--images <dirs...>).")
    missing = [str(d) for d in image_dirs if not Path(d).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"image folder(s) not found: {missing}. Give the COCO image folders (e.g. "
            "coco/train2014 and coco/val2014, unzipped)."
        )
    images: list[Path] = []
    seen: dict[str, Path] = {}
    for d in image_dirs:
        found = sorted(
            p for p in Path(d).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not found:
            raise ValueError(
                f"image folder {str(d)!r} holds no {'/'.join(IMAGE_SUFFIXES)} files; give the "
                "folders that hold the COCO images (e.g. coco/train2014)."
            )
        for p in found:
            if p.stem in seen:
                raise ValueError(
                    f"image id {p.stem!r} appears twice: {str(seen[p.stem])!r} and {str(p)!r}; "
                    "the file stem is the image id, so keep one of them."
                )
            seen[p.stem] = p
        images += found
    return images


def load_image(path: str | os.PathLike, image_size: int) -> tuple[torch.Tensor, int, int]:
    """Read an image as RGB, resize and normalise it as the model does.

    Returns:
        ``(pixels (3, image_size, image_size) float32, height, width)`` (the original size).

    Raises:
        ValueError: naming the file when it cannot be read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image {str(path)!r} ({e}). {_BAD_IMAGE_FIX}") from e
    width, height = rgb.size
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    pixels = pixels[None].float().div_(255.0)
    return clip_input(pixels, image_size)[0], height, width


def cell_boxes(rows: int, cols: int, height: int, width: int) -> np.ndarray:
    """The grid cells' rectangles ``(rows * cols, 4)`` ``float32`` ``x1, y1, x2, y2`` in pixels
    of a ``height`` x ``width`` image, row-major (the order of the grid features)."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.stack(
        [c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows],
        axis=1,
    ).astype(np.float32)


def _trunk(encoder: str, checkpoint: str | os.PathLike | None) -> torch.nn.Module:
    """The frozen CLIP ResNet trunk of ``encoder``, with ``checkpoint``'s weights."""
    with torch.random.fork_rng(devices=[]):  # random weights are the same in every run
        torch.manual_seed(0)
        trunk = build_clip_resnet(encoder)
    if checkpoint is None:
        log.warning(
            "no --checkpoint: the %s grid features come from RANDOM weights (seed 0; tests "
            "only); give OpenAI's checkpoint (RN50.pt, ...) for a store to train on",
            encoder,
        )
    else:
        try:
            load_openai_clip_visual(trunk, checkpoint, encoder)
        except ValueError as e:
            raise ValueError(
                f"{e} (prepare clip-grid: give the --encoder of this checkpoint, or the "
                f"checkpoint of --encoder {encoder})"
            ) from e
    return trunk.requires_grad_(False).eval()


def _grid_shape(encoder: str, image_size: int) -> tuple[int, int, int]:
    """``(channels, rows, cols)`` of the trunk's output at ``image_size`` (sizes only)."""
    with torch.device("meta"):
        trunk = build_clip_resnet(encoder).eval()
        _, c, rows, cols = trunk(torch.zeros(1, 3, image_size, image_size)).shape
    return int(c), int(rows), int(cols)


def convert_clip_grid(
    image_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    encoder: str = "resnet50_clip",
    checkpoint: str | os.PathLike | None = None,
    image_size: int = 448,
    dtype: str = "float16",
    batch_size: int = 32,
    device: str = "cpu",
    workers: int | None = None,
    chunk_rows: int = 256,
    progress: bool = True,
    after_chunk: Callable[[int], None] | None = None,
) -> Path:
    """Compute the CLIP grid features of every image of ``image_dirs`` into a
    :class:`~vlcompress.data.regions.RegionStore` at ``out`` (resumable, atomic).

    Args:
        image_dirs: image folders (COCO ``train2014``, ``val2014``); see :func:`list_images`.
        out: the store folder to create (must not exist, or be empty).
        encoder: the CLIP ResNet (a key of
            :data:`~vlcompress.encoders.clip_resnet.CLIP_RESNETS`).
        checkpoint: OpenAI's checkpoint of that encoder (``RN50.pt``); ``None``: random weights
            (tests; a warning is logged).
        image_size: images are resized to this square size (the model's ``image_size``; a
            multiple of 32).
        dtype: ``float16`` (the default) or ``float32`` for the features.
        batch_size: images per forward pass.
        device: where the trunk runs (``cpu``, ``cuda``, ``cuda:1``).
        workers: threads decoding and resizing images (default: up to 8 CPU cores; 0: none).
        chunk_rows: images committed at a time (the most a crash can lose).
        progress: show a rich progress bar (images).
        after_chunk: called with the number of images committed after each chunk (tests use
            it to interrupt a conversion).

    Returns:
        ``out`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: for a missing folder or checkpoint.
        FileExistsError: when ``out`` already holds something else than this conversion.
        ValueError: for bad arguments, no images, an unreadable image (named), a checkpoint of
            another encoder, or an unfinished conversion of other inputs in ``<out>.partial``.

    Example::

        convert_clip_grid(["coco/train2014", "coco/val2014"], "vqa_v2/clip_rn50_grid",
                          checkpoint="RN50.pt", image_size=448, device="cuda")
    """
    if encoder not in CLIP_RESNETS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(CLIP_RESNETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if image_size < 32 or image_size % 32:
        raise ValueError(
            f"image_size must be a multiple of 32 (the CLIP ResNet's stride), got {image_size}; "
            "e.g. --image-size 448 (a 14x14 grid) or 224 (7x7)."
        )
    if batch_size < 1 or chunk_rows < 1:
        raise ValueError(f"batch_size and chunk_rows must be >= 1, got {batch_size}, {chunk_rows}")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible here; use --device cpu.")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {str(checkpoint)!r} does not exist; give OpenAI's file of the "
            f"encoder (RN50.pt for resnet50_clip, RN50x4.pt for resnet50x4_clip)."
        )
    out = Path(out)
    images = list_images(image_dirs)
    channels, rows, cols = _grid_shape(encoder, image_size)
    folders = [
        {"path": str(Path(d).resolve()), "images": sum(1 for p in images if p.parent == Path(d))}
        for d in image_dirs
    ]
    ckpt = None
    if checkpoint is not None:
        file = Path(checkpoint).expanduser().resolve()
        ckpt = {"path": str(file), "bytes": file.stat().st_size}
    settings: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "clip_grid",
        "sources": {
            "folders": folders,
            "image_names_crc32": zlib.crc32("\n".join(p.name for p in images).encode()),
            "encoder": encoder,
            "checkpoint": ckpt,
            "image_size": image_size,
            "grid": [rows, cols],
        },
        "dtype": dtype,
        "max_boxes": rows * cols,
        "feature_dim": None,
    }
    trunk = _trunk(encoder, checkpoint)  # a wrong checkpoint fails before any folder is made
    flags = "--images/--encoder/--checkpoint/--image-size/--dtype"
    begun = _begin_conversion(out, settings, flags)
    if begun is None:
        return out
    store, image_ids = begun
    done = store.rows
    if image_ids != [p.stem for p in images[:done]]:
        raise ValueError(
            f"{str(store.folder)!r} holds other images than the folders' first {done}; delete "
            "that folder to start over."
        )
    trunk = trunk.to(device)
    seen = {name: None for name in image_ids}
    n_workers = min(8, os.cpu_count() or 1) if workers is None else workers
    _run(
        store, trunk, images, done, image_ids, seen, image_size, batch_size, device, n_workers,
        chunk_rows, progress, after_chunk, (rows, cols, channels),
    )  # fmt: skip
    _finish_conversion(store, out, image_ids)
    return out


def _batches(
    images: list[Path], start: int, image_size: int, batch_size: int, workers: int
) -> Iterator[list[tuple[Path, torch.Tensor, int, int]]]:
    """Decoded batches of ``images[start:]``, the next batch read by ``workers`` threads while
    the current one runs."""
    todo = [images[i : i + batch_size] for i in range(start, len(images), batch_size)]
    if workers <= 0:
        for paths in todo:
            yield [(p, *load_image(p, image_size)) for p in paths]
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="clip-grid-read") as pool:

        def submit(paths: list[Path]) -> list[tuple[Path, Future]]:
            return [(p, pool.submit(load_image, p, image_size)) for p in paths]

        pending = submit(todo[0]) if todo else []
        for i in range(len(todo)):
            current, pending = pending, submit(todo[i + 1]) if i + 1 < len(todo) else []
            yield [(p, *f.result()) for p, f in current]


def _run(
    store: _PartialStore,
    trunk: torch.nn.Module,
    images: list[Path],
    start: int,
    image_ids: list[str],
    seen: dict[str, Any],
    image_size: int,
    batch_size: int,
    device: str,
    workers: int,
    chunk_rows: int,
    progress: bool,
    after_chunk: Callable[[int], None] | None,
    grid: tuple[int, int, int],
) -> None:
    """Run the trunk over ``images[start:]`` and commit chunks of ``chunk_rows`` images."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    rows, cols, channels = grid
    columns = (
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    pending: list[RegionRecord] = []

    def commit() -> None:
        store.commit(pending, [store.rows + len(pending)])
        pending.clear()
        if after_chunk is not None:
            after_chunk(store.rows)

    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("CLIP grid features (images)", total=len(images), completed=start)
        index = start
        for batch in _batches(images, start, image_size, batch_size, workers):
            pixels = torch.stack([b[1] for b in batch]).to(device, non_blocking=True)
            with torch.inference_mode():
                grid_out = trunk(pixels)
            if tuple(grid_out.shape[1:]) != (channels, rows, cols):
                raise RuntimeError(
                    f"the trunk gave grids {tuple(grid_out.shape[1:])}, expected "
                    f"{(channels, rows, cols)}"
                )
            cells = grid_out.flatten(2).transpose(1, 2).float().cpu().numpy()
            for (path, _, height, width), feats in zip(batch, cells):
                index += 1
                record = RegionRecord(
                    path.stem, height, width, cell_boxes(rows, cols, height, width), feats
                )
                _check_record(store, record, seen, str(path), index)
                pending.append(record)
                image_ids.append(record.image_id)
                if len(pending) == chunk_rows:
                    commit()
            bar.update(task, completed=index)
        if pending:
            commit()
