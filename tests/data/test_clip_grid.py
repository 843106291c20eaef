"""CLIP grid features into a region store: the model's own grid features and the cells' boxes,
resumable and atomic conversion, input errors, ``prepare clip-grid``, and CLIP-ViL reading the
store exactly as it reads the images."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import vlcompress.data.clip_grid as clip_grid
from vlcompress.cli import main
from vlcompress.data import VLBatch
from vlcompress.data.clip_grid import cell_boxes, convert_clip_grid
from vlcompress.data.regions import RegionStore
from vlcompress.encoders import build_clip_resnet
from vlcompress.models import build_model

SIZE = 64  # image_size: a 2x2 grid of 256 channels with the tiny encoder
# (folder, image id, height, width, format, PIL mode): sizes, formats and modes differ
IMAGES = [
    ("val2014", "COCO_val2014_000000000073", 70, 50, "JPEG", "RGB"),
    ("val2014", "COCO_val2014_000000000042", 48, 80, "PNG", "RGB"),
    ("val2014", "COCO_val2014_000000000074", 64, 64, "PNG", "L"),
    ("train2014", "COCO_train2014_000000000009", 33, 90, "PNG", "RGBA"),
]
ORDER = [  # folders in the order given (train, val), each sorted by file name
    "COCO_train2014_000000000009",
    "COCO_val2014_000000000042",
    "COCO_val2014_000000000073",
    "COCO_val2014_000000000074",
]


@pytest.fixture
def images(tmp_path):
    """The image folders ``[train2014, val2014]`` and the files by image id."""
    rng = np.random.default_rng(0)
    files = {}
    for folder, name, h, w, fmt, mode in IMAGES:
        (tmp_path / folder).mkdir(exist_ok=True)
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        arr = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        arr = arr[..., 0] if mode == "L" else arr
        path = tmp_path / folder / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(arr, mode).save(path, fmt)
        files[name] = path
    return [tmp_path / "train2014", tmp_path / "val2014"], files


def _openai_key(k: str) -> str:
    """timm's CLIP ResNet key -> OpenAI's (the inverse of timm's ``_convert_openai_clip``)."""
    k = re.sub(r"^stem\.conv(\d)\.conv\.", r"conv\1.", k)
    k = re.sub(r"^stem\.conv(\d)\.bn\.", r"bn\1.", k)
    k = re.sub(
        r"^stages\.(\d)\.(\d+)\.conv(\d)_\w+?\.(conv|bn)\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.{m[4]}{m[3]}.", k,
    )  # fmt: skip
    k = re.sub(
        r"^stages\.(\d)\.(\d+)\.shortcut\.conv\.(conv|bn)\.",
        lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{0 if m[3] == 'conv' else 1}.", k,
    )  # fmt: skip
    return "visual." + k


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny CLIP ResNet in OpenAI's state-dict layout (with real BatchNorm statistics, an
    attention pool and a text tower that are not read)."""
    torch.manual_seed(5)
    trunk = build_clip_resnet("tiny")
    for mod in trunk.modules():
        if isinstance(mod, nn.BatchNorm2d):
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.normal_(mod.bias, std=0.1)
            mod.running_mean.normal_(std=0.1)
            mod.running_var.uniform_(0.5, 1.5)
    state = {_openai_key(k): v for k, v in trunk.state_dict().items()}
    state["visual.attnpool.c_proj.weight"] = torch.randn(16, 256)
    state["token_embedding.weight"] = torch.randn(10, 8)
    path = tmp_path_factory.mktemp("clip") / "RN_tiny.pt"
    torch.save(state, path)
    return path


def _model(checkpoint, size=SIZE):
    torch.manual_seed(0)
    return build_model(
        "clip_vil_tiny", 50, 7, visual_checkpoint=str(checkpoint), image_size=size
    ).eval()


def _pixels(path):
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def _arrays(folder):
    store = RegionStore(folder)
    return {k: np.array(v) for k, v in store.arrays.items()} | {"ids": store.image_ids}


def _same(a, b):
    assert a["ids"] == b["ids"]
    for k in ("boxes", "num_boxes", "image_size"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # the same images, batched differently around the interruption
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


def test_store_holds_the_models_grid_features_and_the_cells(images, checkpoint, tmp_path):
    dirs, files = images
    out32 = convert_clip_grid(
        dirs, tmp_path / "g32", encoder="tiny", checkpoint=checkpoint, image_size=SIZE,
        dtype="float32", batch_size=3, workers=2, progress=False,
    )  # fmt: skip
    out16 = convert_clip_grid(
        dirs, tmp_path / "g16", encoder="tiny", checkpoint=checkpoint, image_size=SIZE,
        batch_size=2, workers=0, progress=False,
    )  # fmt: skip
    s32, s16 = RegionStore(out32), RegionStore(out16)
    assert s32.image_ids == s16.image_ids == ORDER
    assert (s32.max_boxes, s32.feature_dim) == (4, 256)
    assert s16.arrays["features"].dtype == np.float16
    m = s32.manifest
    assert m["kind"] == "clip_grid" and m["dtype"] == "float32"
    src = m["sources"]
    assert (src["encoder"], src["image_size"], src["grid"]) == ("tiny", SIZE, [2, 2])
    assert [f["images"] for f in src["folders"]] == [1, 3]
    assert src["checkpoint"]["path"] == str(checkpoint.resolve())
    model = _model(checkpoint)
    feats, boxes, mask = s32.batch(s32.rows(ORDER))
    feats16, boxes16, _ = s16.batch(s16.rows(ORDER))
    assert mask.all()  # every cell is real
    unit = torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]])
    for i, name in enumerate(ORDER):
        with torch.no_grad():
            grid = model.grid_features(_pixels(files[name]))  # (1, 256, 2, 2)
        expected = grid[0].flatten(1).T  # row-major cells
        torch.testing.assert_close(feats[i], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats16[i], expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(boxes[i], unit)  # the cells, normalised by the store
        torch.testing.assert_close(boxes16[i], unit)
        _, _, h, w, _, _ = next(x for x in IMAGES if x[1] == name)
        np.testing.assert_array_equal(s32.arrays["image_size"][i], [h, w])
    # the cells in pixels of the original image, row-major
    np.testing.assert_array_equal(
        cell_boxes(2, 3, 48, 90),
        [[0, 0, 30, 24], [30, 0, 60, 24], [60, 0, 90, 24],
         [0, 24, 30, 48], [30, 24, 60, 48], [60, 24, 90, 48]],
    )  # fmt: skip


class Stop(Exception):
    """Injected failure (a killed conversion)."""


def _stop_at(k):
    def hook(rows):
        if rows >= k:
            raise Stop(rows)

    return hook


def _convert(dirs, out, **kw):
    kw = {"encoder": "tiny", "image_size": SIZE, "dtype": "float32", "progress": False} | kw
    return convert_clip_grid(dirs, out, **kw)


def test_killed_conversion_resumes_to_the_same_store(images, tmp_path):
    dirs, _ = images
    straight = _convert(dirs, tmp_path / "straight", batch_size=4)
    out = tmp_path / "cut"
    for k in (1, 3):  # killed twice, chunks of 1 image inside batches of 3
        with pytest.raises(Stop):
            _convert(dirs, out, chunk_rows=1, batch_size=3, after_chunk=_stop_at(k))
        assert not out.exists()  # atomic: nothing under the final name
        assert (tmp_path / "cut.partial" / "progress.json").is_file()
    seen = []
    _convert(dirs, out, chunk_rows=1, batch_size=3, after_chunk=seen.append)
    assert seen == [4]  # only the last image was left
    assert not (tmp_path / "cut.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    _same(_arrays(straight), _arrays(out))


def test_other_settings_never_mix_with_a_partial_or_finished_store(images, tmp_path, caplog):
    dirs, files = images
    out = tmp_path / "g"
    with pytest.raises(Stop):
        _convert(dirs, out, chunk_rows=2, after_chunk=_stop_at(2))
    with pytest.raises(ValueError, match="unfinished conversion of other inputs.*image_size.*"
                       "--images/--encoder/--checkpoint/--image-size"):  # fmt: skip
        _convert(dirs, out, image_size=96)
    with pytest.raises(ValueError, match="unfinished conversion of other inputs.*dtype"):
        _convert(dirs, out, dtype="float16")
    extra = files["COCO_val2014_000000000042"].with_name("COCO_val2014_000000000043.png")
    extra.write_bytes(files["COCO_val2014_000000000042"].read_bytes())
    with pytest.raises(ValueError, match="unfinished conversion of other inputs.*folders"):
        _convert(dirs, out)
    extra.unlink()
    _convert(dirs, out)  # the same inputs again: resumed and finished
    mtime = (out / "regions.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        _convert(dirs, out)  # already done: nothing rewritten
    assert (out / "regions.json").stat().st_mtime_ns == mtime
    assert "already converted" in caplog.text
    with pytest.raises(FileExistsError, match="choose another --out, or delete it"):
        _convert(dirs, out, image_size=96)


def test_input_errors_name_the_file_and_the_fix(images, checkpoint, tmp_path):
    dirs, files = images
    with pytest.raises(FileNotFoundError, match="image folder.*nowhere.*COCO image folders"):
        _convert([dirs[0], tmp_path / "nowhere"], tmp_path / "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="'.*empty' holds no .jpg/.jpeg/.png files"):
        _convert([tmp_path / "empty"], tmp_path / "a")
    twin = dirs[1] / "COCO_val2014_000000000042.jpg"
    twin.write_bytes(files["COCO_val2014_000000000073"].read_bytes())
    with pytest.raises(ValueError, match="'COCO_val2014_000000000042' appears twice"):
        _convert(dirs, tmp_path / "a")
    twin.unlink()
    with pytest.raises(ValueError, match="multiple of 32.*--image-size 448"):
        _convert(dirs, tmp_path / "a", image_size=100)
    with pytest.raises(ValueError, match="unknown encoder 'rn50'"):
        _convert(dirs, tmp_path / "a", encoder="rn50")
    with pytest.raises(FileNotFoundError, match="RN50.pt' does not exist"):
        _convert(dirs, tmp_path / "a", checkpoint=tmp_path / "RN50.pt")
    with pytest.raises(ValueError, match="is the CLIP ResNet tiny.*give the --encoder of this"):
        _convert(dirs, tmp_path / "a", encoder="resnet50_clip", checkpoint=checkpoint)
    assert not (tmp_path / "a.partial").exists()  # refused before anything was written
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
            _convert(dirs, tmp_path / "a", device="cuda")
    bad = files["COCO_val2014_000000000073"]
    bad.write_bytes(bad.read_bytes()[:20])  # a truncated download
    with pytest.raises(ValueError, match=f"cannot read image '{re.escape(str(bad))}'.*good copy"):
        _convert(dirs, tmp_path / "a", workers=2)
    assert not (tmp_path / "a").exists()


def test_prepare_clip_grid_command(images, checkpoint, tmp_path, capsys, caplog, monkeypatch):
    dirs, _ = images
    out = tmp_path / "grid"
    args = ["prepare", "clip-grid", "--images", *map(str, dirs), "--encoder", "tiny",
            "--image-size", str(SIZE), "--batch-size", "2"]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert main([*args, "--out", str(out), "--dtype", "float32"]) == 0
    assert "RANDOM weights" in caplog.text  # no --checkpoint: random weights, said loudly
    assert "CLIP grid store ready" in capsys.readouterr().out
    store = RegionStore(out)
    assert store.image_ids == ORDER and store.manifest["dtype"] == "float32"
    ckpt = ["--checkpoint", str(checkpoint), "--workers", "0"]
    assert main([*args, *ckpt, "--out", str(tmp_path / "w")]) == 0
    assert RegionStore(tmp_path / "w").manifest["sources"]["checkpoint"] is not None
    # bad inputs: exit 1 with the message
    assert main([*args, "--out", str(tmp_path / "x"), "--image-size", "100"]) == 1
    assert "multiple of 32" in capsys.readouterr().err
    # interrupted: exit 130, rerun to continue

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(clip_grid, "load_image", interrupted)
    assert main([*args, "--workers", "0", "--out", str(tmp_path / "i")]) == 130
    assert "rerun the same command" in capsys.readouterr().err
    # the options of the two kinds of prepare do not mix (usage errors: exit 2)
    for wrong in (
        ["prepare", "clip-grid", "--out", str(tmp_path / "y")],
        [*args, "--tsv", "a.tsv", "--out", str(tmp_path / "y")],
        [*args, "--max-boxes", "10", "--out", str(tmp_path / "y")],
        ["prepare", "vqa_v2", "--images", str(dirs[0]), "--out", str(tmp_path / "y")],
        ["prepare", "vqa_v2", "--out", str(tmp_path / "y")],
    ):
        with pytest.raises(SystemExit) as e:
            main(wrong)
        assert e.value.code == 2
    assert "required: --tsv" in capsys.readouterr().err


def test_clip_vil_reads_the_store_as_it_reads_the_images(images, checkpoint, tmp_path):
    """The point of the store: CLIP-ViL answers the same from stored grids as from pixels."""
    dirs, files = images
    size = 96  # a 3x3 grid
    out = _convert(dirs, tmp_path / "g", checkpoint=checkpoint, image_size=size)
    store = RegionStore(out)
    model = _model(checkpoint, size)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (len(ORDER), 6), generator=g)
    feats, boxes, mask = store.batch(store.rows(ORDER))
    assert feats.shape == (4, 9, 256)
    stored = VLBatch(text_ids=ids, text_mask=ids != 0, visual=feats, visual_mask=mask, boxes=boxes)
    with torch.no_grad():
        from_store = model(stored)
        for i, name in enumerate(ORDER):  # the images at their own sizes, one at a time
            pixels = VLBatch(text_ids=ids[i : i + 1], text_mask=ids[i : i + 1] != 0,
                             visual=_pixels(files[name]))  # fmt: skip
            torch.testing.assert_close(from_store[i : i + 1], model(pixels), rtol=1e-4, atol=1e-5)
    assert json.loads((out / "regions.json").read_text())["max_boxes"] == 9
