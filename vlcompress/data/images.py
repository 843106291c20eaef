"""Images for models that read pixels (ViLT, METER): ViLT's resize rule, padding a batch with
its pixel mask, and a checked on-disk cache of resized images.

**Resize rule** (:class:`ResizeRule`), as dandelin/ViLT's ``MinMaxResize``
(``vilt/transforms/utils.py``) and transformers' ``ViltImageProcessor``: the shorter side is
scaled to ``shorter``; if the longer side then exceeds ``longer``, both are scaled down so that
it equals ``longer`` (aspect ratio kept); both sides are rounded (``int(x + 0.5)``) and then
floored to a multiple of ``divisor`` (32, the ViLT patch); PIL bicubic on the RGB image. ViLT
calls it through ``pixelbert_transform(size=384)``, whose ``longer`` is
``int(1333 / 800 * 384) = 639`` (the paper's "at most 640"): :data:`VILT_LONGER`.

**Cache** (:class:`ImageCache`): every image is decoded and resized once and stored as raw
``uint8`` ``(3, h, w)`` pixels in shard files of at most ``shard_bytes`` (256 MiB), listed
in a ``manifest.json`` (per shard: its images with their byte offsets and sizes, its size and
SHA-256). Shards rather than one file per image: a few hundred files instead of hundreds of
thousands (COCO, NLVR2), one checksum per shard, bounded atomic writes, and a build that
resumes after an interruption (the manifest is rewritten after each shard). Raw pixels rather
than re-encoded PNG / JPEG: a batch is read through memory maps with no decoding and no loss,
at about 0.65 MB per image at 384 px (~80 GB for COCO train2014 + val2014). The cache folder
is keyed by the source folder and the resize rule (so ``vqa_v2`` and ``vqa_cp_v2``, which
read the same COCO folder, share one and extend it in turn).

**Checks**: each shard's SHA-256 is computed once, when it is written (the file is read back
and compared with the bytes meant for it; a mismatch stops the build with an ``OSError``).
Opening the cache then checks only each shard's size (``verify="size"``, the default: a
process reads no pixel until a batch needs it); ``verify="checksum"`` also hashes every shard
once per process (the full check, ~80 GB read for COCO; ask for it after a disk problem).
A missing, truncated or corrupt shard is dropped with a warning and its images are rebuilt.

**Several processes** (every rank of a DDP launch runs ``prepare_data``; two benchmarks sharing
a folder) may open and build one cache at once: a build holds an exclusive ``fcntl.flock`` on
``<folder>/.lock`` (the others wait, then find the images built), re-reads the on-disk
manifest under the lock and extends it; shards are named by their content's SHA-256
(``shard-<hash>.u8``), so a name is never reused for other content and a shard another process
memory-mapped never changes under it; a build deletes only the shards the on-disk manifest
does not list (dropped as damaged, or left by an interrupted build) and the temporary files of
interrupted writes. Readers take no lock (the manifest is replaced atomically). On a file
system without ``flock`` (some Lustre mounts: mount with ``-o flock``) a build goes on without
the lock, warns, and deletes nothing: correct, but concurrent processes may resize the same
images twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from vlcompress.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = [
    "VILT_LONGER",
    "VILT_SHORTER",
    "ImageCache",
    "ResizeRule",
    "default_cache_dir",
    "load_rgb",
    "pad_images",
]

VILT_SHORTER = 384
"""ViLT's shorter side (``image_size = 384`` of its fine-tuning configs)."""
VILT_LONGER = int(1333 / 800 * VILT_SHORTER)
"""ViLT's longer-side limit, 639: ``pixelbert_transform`` derives it as ``int(1333 / 800 *
shorter)``, as transformers' ``ViltImageProcessor`` does."""
MANIFEST = "manifest.json"
LOCK = ".lock"
CACHE_VERSION = 1
_VERIFIED: set[tuple[str, int, int]] = set()  # (shard path, size, mtime_ns) checked this process


def default_cache_dir(cache_dir: str | None = None) -> Path:
    """``cache_dir``, else ``$VLCOMPRESS_CACHE``, else ``~/.cache/vlcompress``."""
    return Path(
        cache_dir or os.environ.get("VLCOMPRESS_CACHE", Path.home() / ".cache" / "vlcompress")
    )


@dataclass(frozen=True)
class ResizeRule:
    """ViLT's resize (see the module docstring): shorter side to ``shorter``, longer side at
    most ``longer``, both floored to a multiple of ``divisor``.

    Raises:
        ValueError: for a non-positive size or ``longer < shorter``.
    """

    shorter: int = VILT_SHORTER
    longer: int = VILT_LONGER
    divisor: int = 32

    def __post_init__(self) -> None:
        if min(self.shorter, self.longer, self.divisor) < 1 or self.longer < self.shorter:
            raise ValueError(
                f"resize: need 1 <= shorter <= longer and divisor >= 1, got shorter="
                f"{self.shorter}, longer={self.longer}, divisor={self.divisor} (ViLT: 384, 639, 32)."
            )

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The resized ``(width, height)`` of a ``width`` x ``height`` image (never below
        ``divisor``: ViLT would give 0 for an extremely thin image)."""
        scale = self.shorter / min(width, height)
        if height < width:
            new_h, new_w = float(self.shorter), scale * width
        else:
            new_h, new_w = scale * height, float(self.shorter)
        if max(new_h, new_w) > self.longer:
            scale = self.longer / max(new_h, new_w)
            new_h, new_w = new_h * scale, new_w * scale
        h, w = int(new_h + 0.5), int(new_w + 0.5)
        d = self.divisor
        return max(d, w // d * d), max(d, h // d * d)

    def __call__(self, image: Any) -> Any:
        """``image`` (a PIL image) converted to RGB and resized (PIL bicubic)."""
        from PIL import Image

        image = image.convert("RGB")
        return image.resize(self.size(*image.size), resample=Image.BICUBIC)

    def key(self) -> str:
        """A short text naming the rule (part of the cache folder's name)."""
        return f"s{self.shorter}-l{self.longer}-d{self.divisor}"


def load_rgb(path: str | Path, rule: ResizeRule | None = None) -> np.ndarray:
    """The image at ``path`` as ``uint8`` ``(3, h, w)``, resized by ``rule`` when given.

    Raises:
        FileNotFoundError: for a missing file.
        ValueError: for a file PIL cannot read (naming it).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist.")
    try:
        with Image.open(path) as im:
            im = rule(im) if rule is not None else im.convert("RGB")
            pixels = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(
            f"image {str(path)!r} cannot be read ({e}); the file is damaged, download it again."
        ) from e
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def pad_images(
    images: Sequence[torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch of images (or of image pairs / tuples) to its largest height and width, as
    ViLT's collate does (zeros at the bottom and right).

    Args:
        images: per example a ``(3, h, w)`` image, or a sequence of them (a pair: left,
            right); ``uint8`` (0..255) or float in [0, 1]; sizes may differ.

    Returns:
        ``visual`` float in [0, 1], ``(B, 3, H, W)`` (pairs ``(B, K, 3, H, W)``) and the pixel
        mask bool ``(B, H, W)`` (pairs ``(B, K, H, W)``), True on real pixels.

    Raises:
        ValueError: for an empty batch, an image not shaped ``(3, h, w)`` or examples with
            different numbers of images.
    """
    if not len(images):
        raise ValueError("pad_images: the batch is empty.")
    single = isinstance(images[0], (torch.Tensor, np.ndarray))
    groups = [[x] if single else list(x) for x in images]
    k = len(groups[0])
    flat = [torch.as_tensor(im) for g in groups for im in g]
    if any(len(g) != k for g in groups) or any(im.dim() != 3 or im.shape[0] != 3 for im in flat):
        shapes = [tuple(im.shape) for im in flat]
        raise ValueError(
            f"pad_images: every example must hold the same number of (3, h, w) images; got "
            f"{[len(g) for g in groups]} image(s) per example, shapes {shapes[:6]}."
        )
    height = max(im.shape[1] for im in flat)
    width = max(im.shape[2] for im in flat)
    dtype = torch.uint8 if all(im.dtype == torch.uint8 for im in flat) else torch.float32
    out = torch.zeros(len(groups), k, 3, height, width, dtype=dtype)
    mask = torch.zeros(len(groups), k, height, width, dtype=torch.bool)
    for i, g in enumerate(groups):
        for j, im in enumerate(g):
            h, w = im.shape[1:]
            out[i, j, :, :h, :w] = torch.as_tensor(im)
            mask[i, j, :h, :w] = True
    visual = out.float().div_(255.0) if dtype == torch.uint8 else out
    if single:
        return visual[:, 0], mask[:, 0]
    return visual, mask


class ImageCache:
    """A checked on-disk cache of resized images (see the module docstring).

    Args:
        source: the folder the images' names are relative to.
        cache_dir: the cache root; this cache is ``<cache_dir>/images/<folder>-<rule>-<key>``,
            keyed by the resolved ``source`` and ``rule``.
        rule: the resize rule.
        verify: ``size`` (the default: each shard's size when the cache is opened; its SHA-256
            was checked when it was written) or ``checksum`` (also each shard's SHA-256, once
            per process: the full check, which reads the whole cache).
        shard_bytes: the largest shard (a shard holds at least one image).

    Example::

        cache = ImageCache("coco", "~/.cache/vlcompress", ResizeRule())
        cache.ensure(["val2014/COCO_val2014_000000000042.jpg"])
        rows = cache.rows(["val2014/COCO_val2014_000000000042.jpg"])
        visual, mask = pad_images(cache.read(rows))
    """

    def __init__(
        self,
        source: str | Path,
        cache_dir: str | Path,
        rule: ResizeRule | None = None,
        *,
        verify: Literal["checksum", "size"] = "size",
        shard_bytes: int = 256 << 20,
    ) -> None:
        if verify not in ("checksum", "size"):
            raise ValueError(f"ImageCache verify must be 'size' or 'checksum', not {verify!r}.")
        self.source = Path(source).expanduser()
        self.rule = rule or ResizeRule()
        self.verify, self.shard_bytes = verify, int(shard_bytes)
        resolved = str(self.source.resolve())
        key = hashlib.sha1(f"{resolved}|{self.rule.key()}".encode()).hexdigest()[:10]
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.source.resolve().name) or "images"
        self.folder = Path(cache_dir).expanduser() / "images" / f"{slug}-{self.rule.key()}-{key}"
        self._loaded = False
        self._shards: list[dict[str, Any]] = []
        self._entries = np.zeros((0, 4), np.int64)  # row -> (shard, offset, h, w)
        self._row: dict[str, int] = {}
        self._maps: dict[int, np.ndarray] = {}
        self._listed: list[str] | None = None  # shards the manifest read last lists (None: none
        # of ours: absent, unreadable or for other settings)
        self._warned: set[str] = set()  # problems already reported (a build reloads)

    # ------------------------------------------------------------------ manifest
    @property
    def manifest_path(self) -> Path:
        """The manifest file."""
        return self.folder / MANIFEST

    def _settings(self) -> dict[str, Any]:
        return {
            "version": CACHE_VERSION,
            "source": str(self.source.resolve()),
            "rule": asdict(self.rule),
        }

    def _shard_problem(self, shard: dict[str, Any]) -> str | None:
        """What is wrong with one shard (``None``: sound)."""
        path = self.folder / shard["file"]
        try:
            st = path.stat()
        except OSError:
            return "missing"
        if st.st_size != shard["bytes"]:
            return f"it has {st.st_size:,} bytes, the manifest says {shard['bytes']:,} (truncated?)"
        memo = (str(path), st.st_size, st.st_mtime_ns)
        if self.verify == "checksum" and memo not in _VERIFIED:
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            if digest.hexdigest() != shard["sha256"]:
                return "its checksum differs from the manifest's (corrupt)"
            _VERIFIED.add(memo)
        return None

    def load(self) -> None:
        """Read the manifest and check every shard; a damaged shard is dropped with a warning
        (its images count as missing, :meth:`ensure` rebuilds them). Idempotent."""
        if self._loaded:
            return
        self._loaded = True
        self._shards, self._listed = [], None
        if self.manifest_path.is_file():
            try:
                manifest = json.loads(self.manifest_path.read_text())
                settings_ok = {k: manifest.get(k) for k in self._settings()} == self._settings()
            except (OSError, ValueError, AttributeError) as e:
                self._warn(
                    "image cache manifest %s is unreadable (%s); rebuilding the cache",
                    self.manifest_path, e,
                )  # fmt: skip
                manifest, settings_ok = {}, False
            if manifest and not settings_ok:
                self._warn("image cache %s was made for other settings; rebuilding it",
                           self.folder)  # fmt: skip
            if settings_ok:
                self._listed = [shard["file"] for shard in manifest.get("shards", [])]
            for shard in manifest.get("shards", []) if settings_ok else []:
                problem = self._shard_problem(shard)
                if problem is None:
                    self._shards.append(shard)
                else:
                    self._warn(
                        "image cache shard %s is unusable (%s); its %d image(s) will be rebuilt",
                        self.folder / shard["file"], problem, len(shard["images"]),
                    )  # fmt: skip
        self._reindex()

    def _warn(self, message: str, *args: Any) -> None:
        text = message % args
        if text not in self._warned:
            self._warned.add(text)
            log.warning(text)

    def _reindex(self) -> None:
        rows, self._row = [], {}
        for s, shard in enumerate(self._shards):
            for name, offset, h, w in shard["images"]:
                self._row[name] = len(rows)
                rows.append((s, offset, h, w))
        self._entries = np.asarray(rows, np.int64).reshape(-1, 4)
        self._maps = {}

    def __len__(self) -> int:
        self.load()
        return len(self._row)

    def missing(self, names: Sequence[str]) -> list[str]:
        """The names among ``names`` the cache lacks (in order, unique)."""
        self.load()
        return list(dict.fromkeys(n for n in names if n not in self._row))

    # ------------------------------------------------------------------ building
    @contextlib.contextmanager
    def _build_lock(self) -> Iterator[bool]:
        """Hold an exclusive ``flock`` on ``<folder>/.lock`` (waiting for another process's
        build); yields whether the lock is held (``False``: the file system has no ``flock``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                log.info("image cache %s: another process is building it; waiting for it",
                         self.folder)  # fmt: skip
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning(
                    "image cache %s: the file system cannot lock %s (%s); building without "
                    "the lock (nothing is deleted; processes building at once may resize the "
                    "same images twice). On Lustre, mount with -o flock; or run prepare_data "
                    "once before the launch.", self.folder, LOCK, e,
                )  # fmt: skip
                locked = False
            yield locked
        finally:
            os.close(fd)  # releases the lock

    def _write_manifest(self) -> None:
        manifest = {**self._settings(), "shards": self._shards}
        atomic_write_bytes(self.manifest_path, json.dumps(manifest).encode())
        self._listed = [s["file"] for s in self._shards]

    def _remove_unlisted(self) -> None:
        """Under the lock: delete the shards the on-disk manifest does not list and the
        temporary files of interrupted writes (no other process writes while the lock is
        held)."""
        listed = set(self._listed or ())
        for path in self.folder.iterdir():
            shard = path.name.startswith("shard-") and path.name.endswith(".u8")
            partial = path.name.startswith((".shard-", f".{MANIFEST}.")) and path.name.endswith(
                ".tmp"
            )
            if (shard and path.name not in listed) or partial:
                log.info("image cache %s: removing %s (not in the manifest)", self.folder,
                         path.name)  # fmt: skip
                path.unlink(missing_ok=True)

    def _write_shard(self, data: bytes) -> tuple[str, str]:
        """Write one shard under its content's name and check it as written.

        Returns:
            Its file name and SHA-256.

        Raises:
            OSError: the file does not read back as written (the file is removed).
        """
        digest = hashlib.sha256(data).hexdigest()
        name = f"shard-{digest[:32]}.u8"
        path = self.folder / name
        atomic_write_bytes(path, data)
        check = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                check.update(block)
        if check.hexdigest() != digest:
            path.unlink(missing_ok=True)
            raise OSError(
                f"image cache shard {str(path)!r} does not read back as written (SHA-256 "
                f"{check.hexdigest()} instead of {digest}); the disk or file system under "
                f"{str(self.folder)!r} is faulty: set cache_dir (or $VLCOMPRESS_CACHE) to another "
                "disk."
            )
        st = path.stat()
        _VERIFIED.add((str(path), st.st_size, st.st_mtime_ns))
        return name, digest

    def ensure(
        self,
        names: Sequence[str],
        *,
        description: str = "resizing images",
        path_of: Callable[[str], Path] | None = None,
    ) -> int:
        """Resize and store the images of ``names`` the cache lacks (a rich progress bar while
        building); the manifest is rewritten after each shard, so an interrupted build resumes.

        Safe in several processes at once (see the module docstring): the build holds the
        cache's lock, re-reads the on-disk manifest first (images another process built are
        not resized again) and extends it.

        Args:
            names: image names relative to ``source``.
            description: the progress bar's label.
            path_of: the source file of a name (default ``source / name``).

        Returns:
            The number of images resized.

        Raises:
            FileNotFoundError, ValueError: from :func:`load_rgb` (a missing or unreadable
                image, named).
            OSError: a shard does not read back as written.
        """
        if not self.missing(names):
            return 0
        with self._build_lock() as locked:
            self._loaded = False
            self.load()  # the on-disk manifest now: what other processes built meanwhile
            if self._listed != [s["file"] for s in self._shards]:
                self._write_manifest()  # damaged shards dropped, or a manifest to replace
            if locked:
                self._remove_unlisted()
            todo = self.missing(names)
            if not todo:
                return 0
            self._build(todo, description, path_of or (lambda n: self.source / n))
        return len(todo)

    def _build(self, todo: list[str], description: str, where: Callable[[str], Path]) -> None:
        from rich.progress import track

        chunks: list[bytes] = []
        images: list[list[Any]] = []
        size = 0

        def flush() -> None:
            nonlocal size
            data = b"".join(chunks)
            name, digest = self._write_shard(data)
            self._shards.append({"file": name, "bytes": len(data), "sha256": digest,
                                 "images": list(images)})  # fmt: skip
            self._write_manifest()
            chunks.clear()
            images.clear()
            size = 0

        try:
            for name in track(todo, description=description, transient=True):
                pixels = load_rgb(where(name), self.rule)
                data = pixels.tobytes()
                if chunks and size + len(data) > self.shard_bytes:
                    flush()
                images.append([name, size, int(pixels.shape[1]), int(pixels.shape[2])])
                chunks.append(data)
                size += len(data)
            if chunks:
                flush()
        finally:
            self._reindex()
        log.info("image cache %s: resized %d image(s) (%s)", self.folder, len(todo),
                 self.rule.key())  # fmt: skip

    # ------------------------------------------------------------------ reading
    def rows(self, names: Sequence[str]) -> np.ndarray:
        """Cache rows of ``names`` (int64).

        Raises:
            KeyError: naming the first image the cache lacks (call :meth:`ensure` first).
        """
        self.load()
        try:
            return np.fromiter((self._row[n] for n in names), np.int64, len(names))
        except KeyError as e:
            raise KeyError(
                f"image cache {str(self.folder)!r} has no image {e.args[0]!r}; call ensure() first"
            ) from None

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            path = self.folder / self._shards[shard]["file"]
            self._maps[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[shard]

    def read(self, rows: Sequence[int] | np.ndarray) -> list[torch.Tensor]:
        """The ``uint8`` ``(3, h, w)`` pixels of cache ``rows`` (copies)."""
        out = []
        for s, offset, h, w in self._entries[np.asarray(rows, np.int64)].tolist():
            flat = self._map(s)[offset : offset + 3 * h * w]
            out.append(torch.from_numpy(np.array(flat).reshape(3, h, w)))
        return out

    def __getstate__(self) -> dict[str, Any]:  # memory maps stay out of pickles (workers)
        return {**self.__dict__, "_maps": {}}
