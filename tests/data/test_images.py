"""Images for pixel models: ViLT's resize rule (against transformers' ViltImageProcessor),
padding with the pixel mask, and the checked cache (reuse, resumption, damage rebuilt, checked
when written, built by several processes at once)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import multiprocessing as mp
import pickle
import threading
import time
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from vlcompress.data import images as images_mod
from vlcompress.data.images import (
    VILT_LONGER,
    ImageCache,
    ResizeRule,
    load_rgb,
    pad_images,
)

SIZES = [(640, 480), (480, 640), (640, 360), (1000, 100), (500, 500), (333, 777), (427, 640)]


def test_vilt_rule_by_hand():
    rule = ResizeRule()
    assert (rule.shorter, rule.longer, rule.divisor) == (384, 639, 32) and VILT_LONGER == 639
    assert rule.size(640, 480) == (512, 384)  # shorter side to 384
    assert rule.size(480, 640) == (384, 512)
    assert rule.size(500, 500) == (384, 384)
    # 16:9: 384 x 682.7 exceeds 639 -> 359.4 x 639 -> rounded 359 x 639 -> floored to 32s
    assert rule.size(640, 360) == (608, 352)
    assert ResizeRule(longer=640).size(640, 360) == (640, 352)  # the paper's "640" differs
    assert rule.size(10000, 10) == (608, 32)  # ViLT would give height 0: kept at one divisor
    assert ResizeRule(32, 64, 16).size(640, 360) == (48, 32)
    with pytest.raises(ValueError, match="shorter <= longer"):
        ResizeRule(384, 300)


def test_rule_matches_transformers_vilt_image_processor():
    from transformers import ViltImageProcessor

    processor = ViltImageProcessor()  # shortest_edge 384, size_divisor 32, bicubic
    for w, h in SIZES:
        image = Image.fromarray(np.zeros((h, w, 3), np.uint8))
        out = processor(image, return_tensors="pt", do_pad=False)["pixel_values"]
        assert tuple(out.shape[-2:]) == ResizeRule().size(w, h)[::-1], (w, h)


def test_resize_is_pil_bicubic_on_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 255, (90, 160, 4), dtype=np.uint8), "RGBA")
    path = tmp_path / "a.png"
    rgba.save(path)
    rule = ResizeRule(32, 64, 16)
    got = load_rgb(path, rule)
    expected = np.asarray(rgba.convert("RGB").resize((48, 32), resample=Image.BICUBIC))
    assert got.dtype == np.uint8 and got.shape == (3, 32, 48)
    np.testing.assert_array_equal(got, expected.transpose(2, 0, 1))
    np.testing.assert_array_equal(
        load_rgb(path), np.asarray(rgba.convert("RGB")).transpose(2, 0, 1)
    )


def test_pad_images_singles_and_pairs():
    a = torch.full((3, 2, 4), 255, dtype=torch.uint8)
    b = torch.full((3, 3, 2), 51, dtype=torch.uint8)
    visual, mask = pad_images([a, b])
    assert visual.shape == (2, 3, 3, 4) and visual.dtype == torch.float32
    assert mask.shape == (2, 3, 4) and mask.dtype == torch.bool
    assert mask[0].sum() == 8 and mask[0, :2, :4].all() and not mask[0, 2].any()
    assert mask[1].sum() == 6 and mask[1, :, :2].all() and not mask[1, :, 2:].any()
    assert visual[0, :, :2].eq(1).all() and visual[0, :, 2].eq(0).all()
    assert (
        torch.allclose(visual[1, :, :, :2], torch.tensor(0.2)) and visual[1, :, :, 2:].eq(0).all()
    )
    pairs, pmask = pad_images([(a, b), (b, b)])
    assert pairs.shape == (2, 2, 3, 3, 4) and pmask.shape == (2, 2, 3, 4)
    assert pmask[0, 0].sum() == 8 and pmask[0, 1].sum() == 6 and pmask[1].sum() == 12
    floats, _ = pad_images([torch.rand(3, 2, 2)])
    assert floats.dtype == torch.float32 and floats.max() <= 1
    with pytest.raises(ValueError, match=r"same number of \(3, h, w\) images"):
        pad_images([(a, b), (a,)])
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        pad_images([torch.zeros(1, 2, 2)])


@pytest.fixture
def source(tmp_path):
    """Six images of various aspect ratios (PNG and JPEG) in two sub-folders."""
    rng = np.random.default_rng(1)
    names = []
    for i, (w, h) in enumerate([(64, 48), (48, 64), (80, 45), (50, 50), (30, 90), (96, 40)]):
        name = f"{'a' if i % 2 else 'b'}/img{i}.{'jpg' if i % 3 == 0 else 'png'}"
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "src" / name
        )
        names.append(name)
    return tmp_path / "src", names


RULE = ResizeRule(32, 64, 16)


def _cache(source, tmp_path, **kw):
    return ImageCache(source, tmp_path / "cache", RULE, **kw)


def _first_shard(cache):
    return cache.folder / json.loads(cache.manifest_path.read_text())["shards"][0]["file"]


def test_cache_serves_the_resized_pixels_and_is_reused(source, tmp_path, monkeypatch):
    src, names = source
    cache = _cache(src, tmp_path, shard_bytes=10_000)  # a few images per shard
    assert cache.ensure(names) == 6
    manifest = json.loads(cache.manifest_path.read_text())
    assert len(manifest["shards"]) > 1 and manifest["rule"] == {"shorter": 32, "longer": 64,
                                                                 "divisor": 16}  # fmt: skip
    rows = cache.rows(names[::-1])
    for name, pixels in zip(names[::-1], cache.read(rows)):
        np.testing.assert_array_equal(pixels.numpy(), load_rgb(src / name, RULE))

    # a new process: nothing resized again, the same pixels
    def no_decoding(*a, **k):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(images_mod, "load_rgb", no_decoding)
    again = _cache(src, tmp_path)
    assert again.folder == cache.folder and again.ensure(names) == 0
    assert all(torch.equal(x, y) for x, y in zip(again.read(again.rows(names)),
                                                 cache.read(cache.rows(names))))  # fmt: skip
    clone = pickle.loads(pickle.dumps(again))  # data-loader workers: no memory map pickled
    assert torch.equal(clone.read([0])[0], again.read([0])[0])
    assert _cache(src, tmp_path / "other").folder != cache.folder
    assert ImageCache(src, tmp_path / "cache", ResizeRule(32, 96, 16)).folder != cache.folder


def test_an_interrupted_build_resumes(source, tmp_path):
    src, names = source
    assert _cache(src, tmp_path, shard_bytes=1).ensure(names[:4]) == 4  # one image per shard
    cache = _cache(src, tmp_path)
    assert cache.missing(names) == names[4:] and cache.ensure(names) == 2 and len(cache) == 6


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_a_damaged_cache_is_named_and_rebuilt(source, tmp_path, damage, caplog):
    src, names = source
    cache = _cache(src, tmp_path, shard_bytes=10_000)
    cache.ensure(names)
    expected = [p.clone() for p in cache.read(cache.rows(names))]
    shard = _first_shard(cache)
    good = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(good[: len(good) // 2])
    elif damage == "flip":
        shard.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    elif damage == "delete":
        shard.unlink()
    else:
        cache.manifest_path.write_text(cache.manifest_path.read_text()[:40])
    fresh = _cache(src, tmp_path, verify="checksum")
    with caplog.at_level(logging.WARNING, logger="vlcompress.data.images"):
        rebuilt = fresh.ensure(names)
    said = {"truncate": "truncated?", "flip": "corrupt", "delete": "missing",
            "manifest": "manifest"}[damage]  # fmt: skip
    assert said in caplog.text and ("unusable" in caplog.text or "unreadable" in caplog.text)
    assert 0 < rebuilt <= 6 and (rebuilt == 6) == (damage == "manifest")
    got = fresh.read(fresh.rows(names))
    assert all(torch.equal(x, y) for x, y in zip(got, expected))
    assert sorted(p.name for p in cache.folder.glob("shard-*.u8")) == sorted(
        s["file"] for s in json.loads(cache.manifest_path.read_text())["shards"]
    )  # the damaged shard is gone, not left behind


def test_opening_checks_sizes_by_default_and_checksums_on_demand(source, tmp_path):
    src, names = source
    cache = _cache(src, tmp_path)
    assert cache.verify == "size"  # the default: hashing ~80 GB in every process is too much
    cache.ensure(names)
    shard = _first_shard(cache)
    data = shard.read_bytes()
    shard.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    assert _cache(src, tmp_path).missing(names) == []  # sizes only: nothing read
    assert _cache(src, tmp_path, verify="checksum").missing(names) != []  # the full check
    with pytest.raises(ValueError, match="verify must be"):
        _cache(src, tmp_path, verify="none")


def test_each_shard_is_checked_once_when_written(source, tmp_path, monkeypatch):
    src, names = source
    real = images_mod.atomic_write_bytes

    def flaky_disk(path, data):  # the shard lands on disk with one byte changed
        if path.name.startswith("shard-"):
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        real(path, data)

    monkeypatch.setattr(images_mod, "atomic_write_bytes", flaky_disk)
    cache = _cache(src, tmp_path)
    with pytest.raises(OSError, match="does not read back as written"):
        cache.ensure(names)
    assert not list(cache.folder.glob("shard-*.u8"))  # the bad shard is not left behind
    monkeypatch.setattr(images_mod, "atomic_write_bytes", real)
    assert _cache(src, tmp_path).ensure(names) == 6
    fresh = _cache(src, tmp_path, verify="checksum")  # what was written is what was meant
    assert fresh.missing(names) == []


def test_shards_are_named_by_content_and_a_build_rereads_the_manifest(source, tmp_path):
    """Two caches on one folder (two benchmarks, as vqa_v2 and vqa_cp_v2 share COCO's), both
    opened before either built: the second build keeps the first's shards (it re-reads the
    manifest) and writes its own under new names, so the first still reads its pixels."""
    src, names = source
    first, second = _cache(src, tmp_path, shard_bytes=1), _cache(src, tmp_path, shard_bytes=1)
    assert first.missing(names) == second.missing(names) == names  # both opened empty
    assert first.ensure(names[:3]) == 3
    assert second.ensure(names[::-1]) == 3  # only what the first did not build
    for cache in (first, second):  # the first maps its shards only now, after the second wrote
        for name, pixels in zip(names[:3], cache.read(cache.rows(names[:3]))):
            np.testing.assert_array_equal(pixels.numpy(), load_rgb(src / name, RULE))
    manifest = json.loads(first.manifest_path.read_text())
    files = [s["file"] for s in manifest["shards"]]
    assert len(files) == 6 and sorted(files) == sorted(p.name for p in first.folder.glob("shard-*"))
    assert all(s["file"] == f"shard-{s['sha256'][:32]}.u8" for s in manifest["shards"])
    fresh = _cache(src, tmp_path, verify="checksum")
    assert fresh.missing(names) == []


def test_a_build_waits_for_the_lock_and_removes_only_unlisted_files(source, tmp_path):
    src, names = source
    cache = _cache(src, tmp_path)
    cache.ensure(names[:2])
    listed = {p.name for p in cache.folder.glob("shard-*.u8")}
    (cache.folder / "shard-left-by-a-crash.u8").write_bytes(b"x")
    (cache.folder / ".shard-abc.u8.q1w2.tmp").write_bytes(b"x")  # an interrupted write
    with open(cache.folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is building
        other = _cache(src, tmp_path)
        builder = threading.Thread(target=other.ensure, args=(names,))
        builder.start()
        time.sleep(0.5)
        assert (
            builder.is_alive() and len(json.loads(cache.manifest_path.read_text())["shards"]) == 1
        )
        # not yet: no shard written, nothing deleted
        assert (cache.folder / "shard-left-by-a-crash.u8").exists()
    builder.join(timeout=60)  # closing the file released the lock
    assert not builder.is_alive() and len(other) == 6
    left = {p.name for p in cache.folder.iterdir()}
    assert listed < left and "shard-left-by-a-crash.u8" not in left
    assert ".shard-abc.u8.q1w2.tmp" not in left
    assert left - {".lock", "manifest.json"} == {
        s["file"] for s in json.loads(cache.manifest_path.read_text())["shards"]
    }


def test_without_flock_a_build_goes_on_and_deletes_nothing(source, tmp_path, monkeypatch, caplog):
    src, names = source
    cache = _cache(src, tmp_path)
    cache.ensure(names[:2])
    (cache.folder / "shard-another-process-is-writing.u8").write_bytes(b"x")

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(images_mod.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="vlcompress.data.images"):
        assert _cache(src, tmp_path).ensure(names) == 4
    assert "cannot lock" in caplog.text and "-o flock" in caplog.text
    assert (cache.folder / "shard-another-process-is-writing.u8").exists()
    assert _cache(src, tmp_path, verify="checksum").missing(names) == []


def _build_in_another_process(src, root, names, barrier, results):
    """One process of :func:`test_processes_building_one_cache_at_once`: open the cache, wait
    for the other, build with slow decoding (so that the two builds would interleave), read.
    Puts ``(images decoded, pixels right, pixels)`` or the error's traceback."""
    try:
        decoded = []
        real = images_mod.load_rgb

        def slow(path, rule=None):
            decoded.append(str(path))
            time.sleep(0.1)
            return real(path, rule)

        images_mod.load_rgb = slow
        cache = ImageCache(src, root, RULE, shard_bytes=10_000)
        cache.missing(names)  # opened (empty) before either builds, as every rank does
        barrier.wait(timeout=120)
        cache.ensure(names)
        ordered = sorted(names)
        pixels = [p.numpy() for p in cache.read(cache.rows(ordered))]
        right = all(np.array_equal(p, real(src / n, RULE)) for p, n in zip(pixels, ordered))
        results.put((len(decoded), right, [p.tobytes() for p in pixels]))
    except BaseException:
        results.put(traceback.format_exc())


def test_processes_building_one_cache_at_once(source, tmp_path):
    """Two processes (two DDP ranks; or vqa_v2 and vqa_cp_v2, which add the same images in
    other orders) build one cache at once: one resizes, the other waits and reuses it; both
    read the right pixels and the cache is whole."""
    src, names = source
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_build_in_another_process,
                    args=(src, tmp_path / "cache", order, barrier, results))
        for order in (names, names[::-1])
    ]  # fmt: skip
    for p in procs:
        p.start()
    got = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [g for g in got if isinstance(g, str)]
    assert not errors, errors[0]
    assert [p.exitcode for p in procs] == [0, 0]
    assert sum(n for n, _, _ in got) == 6  # every image resized once, by one process
    assert all(right for _, right, _ in got)
    assert got[0][2] == got[1][2]
    cache = _cache(src, tmp_path, verify="checksum")
    assert cache.missing(names) == []
    pixels = cache.read(cache.rows(sorted(names)))
    assert [p.numpy().tobytes() for p in pixels] == got[0][2]
    files = {s["file"] for s in json.loads(cache.manifest_path.read_text())["shards"]}
    assert files == {p.name for p in cache.folder.glob("shard-*.u8")}


def test_missing_and_unreadable_images_are_named(source, tmp_path):
    src, names = source
    with pytest.raises(FileNotFoundError, match=r"image '.*nothing\.png' does not exist"):
        _cache(src, tmp_path).ensure(["nothing.png"])
    (src / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"image '.*bad\.png' cannot be read"):
        _cache(src, tmp_path).ensure(["bad.png"])
    with pytest.raises(KeyError, match="has no image 'a/img1.png'"):
        _cache(src, tmp_path).rows(["a/img1.png"])
