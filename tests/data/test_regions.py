"""obj36 TSV reader and the memory-mapped region store: round trip, damaged rows, resumable and
atomic conversion, the prepare command."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from fixtures_vqa import image_name, obj36_row, write_obj36_tsv

from vlcompress.cli import main
from vlcompress.data.regions import (
    RegionFileError,
    RegionStore,
    convert_obj36,
    parse_obj36_line,
    read_obj36_tsv,
    store_problem,
)

IMAGES = [
    (image_name("val2014", 393243), 480, 640),
    (image_name("val2014", 42), 640, 427),
    (image_name("val2014", 73), 375, 500),
    (image_name("val2014", 74), 333, 500),
    (image_name("val2014", 133), 425, 640),
]
DIM = 64  # the reader infers the feature size; 2048 is covered by the data-module tests


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "val2014_obj36.tsv"
    return path, write_obj36_tsv(path, IMAGES, dim=DIM)


def _arrays(folder):
    store = RegionStore(folder)
    return {k: np.array(v) for k, v in store.arrays.items()} | {"ids": store.image_ids}


def _same(a, b):
    assert a["ids"] == b["ids"]
    for k in ("features", "boxes", "num_boxes", "image_size"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_round_trip_float32_and_float16(tsv, tmp_path):
    path, regions = tsv
    out32 = convert_obj36([path], tmp_path / "s32", dtype="float32", progress=False)
    out16 = convert_obj36([path], tmp_path / "s16", progress=False)
    s32, s16 = RegionStore(out32), RegionStore(out16)
    assert s32.image_ids == [name for name, _, _ in IMAGES] and len(s32) == 5
    assert isinstance(s32.arrays["features"], np.memmap)  # training reads memory maps
    assert s32.arrays["features"].shape == (5, 36, DIM)
    assert s16.arrays["features"].dtype == np.float16
    rows = s32.rows([IMAGES[3][0], IMAGES[0][0]])
    np.testing.assert_array_equal(rows, [3, 0])
    feats, boxes, mask = s32.batch(rows)
    feats16, _, _ = s16.batch(rows)
    for i, (name, h, w) in enumerate([IMAGES[3], IMAGES[0]]):
        r = regions[name]
        torch.testing.assert_close(feats[i], torch.from_numpy(r["features"]), rtol=0, atol=0)
        torch.testing.assert_close(feats16[i], feats[i], rtol=1e-3, atol=2e-3)
        expected = r["boxes"] / np.array([w, h, w, h], np.float32)
        torch.testing.assert_close(boxes[i], torch.from_numpy(expected))
        assert (0 <= boxes[i]).all() and (boxes[i] <= 1).all()
    assert feats.dtype == torch.float32 and mask.all()
    np.testing.assert_array_equal(s32.arrays["image_size"][1], [640, 427])


def test_fewer_boxes_are_padded_and_masked(tmp_path):
    path = tmp_path / "few.tsv"
    regions = write_obj36_tsv(path, IMAGES[:2], num_boxes=10, dim=DIM)
    store = RegionStore(convert_obj36([path], tmp_path / "s", dtype="float32", progress=False))
    feats, boxes, mask = store.batch([1])
    assert mask.sum() == 10 and mask[0, :10].all()
    assert feats[0, 10:].abs().sum() == 0 and boxes[0, 10:].abs().sum() == 0
    np.testing.assert_array_equal(feats[0, :10].numpy(), regions[IMAGES[1][0]]["features"])


def _damage(path, line, field, value):
    lines = path.read_text().splitlines(keepends=True)
    cols = lines[line - 1].rstrip("\n").split("\t")
    if field == "row":
        cols = cols[:-1]
    else:
        cols[field] = value
    lines[line - 1] = "\t".join(cols) + "\n"
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("field", "value", "named", "problem"),
    [
        (9, "not*base64!", "features", "not valid base64"),
        (8, "AAAA", "boxes", "expected float32 values of shape (36, 4)"),
        (3, "AAAAAAAAAAA=", "objects_id", "expected int64 values of shape (36,)"),
        (7, "many", "num_boxes", "expected a positive integer"),
        ("row", None, "row", "9 tab-separated columns, expected 10"),
    ],
)
def test_corrupt_row_names_file_line_field_and_fix(tsv, tmp_path, field, value, named, problem):
    path, _ = tsv
    _damage(path, 3, field, value)
    with pytest.raises(RegionFileError) as e:
        convert_obj36([path], tmp_path / "s", progress=False)
    msg = str(e.value)
    assert f"{path.resolve()}, line 3, field {named!r}" in msg and problem in msg
    assert "fetch it again" in msg and "rerun the same prepare command" in msg
    assert (e.value.line, e.value.field) == (3, named)
    assert not (tmp_path / "s").exists()


def test_parse_rejects_non_finite_values(tmp_path):
    boxes = np.zeros((2, 4), np.float32)
    feats = np.ones((2, 8), np.float32)
    feats[1, 3] = np.nan
    with pytest.raises(RegionFileError, match="line 7, field 'features': holds NaN"):
        parse_obj36_line(obj36_row("x", 10, 10, boxes, feats).encode(), tmp_path / "f.tsv", 7)


def test_reader_resumes_from_an_offset(tsv):
    path, _ = tsv
    rows = list(read_obj36_tsv(path))
    assert [r.image_id for r, _, _ in rows] == [n for n, _, _ in IMAGES]
    _, offset, line = rows[1]
    again = list(read_obj36_tsv(path, offset, line + 1))
    assert [(r.image_id, o, ln) for r, o, ln in again] == [
        (r.image_id, o, ln) for r, o, ln in rows[2:]
    ]


class Stop(Exception):
    """Injected failure (a killed conversion)."""


def _stop_at(k):
    def hook(rows):
        if rows >= k:
            raise Stop(rows)

    return hook


def test_killed_conversion_resumes_to_identical_arrays(tmp_path):
    a = tmp_path / "a.tsv"
    b = tmp_path / "b.tsv"
    write_obj36_tsv(a, IMAGES[:3], dim=DIM)
    write_obj36_tsv(b, IMAGES[3:], dim=DIM)
    straight = convert_obj36([a, b], tmp_path / "straight", chunk_rows=2, progress=False)
    out = tmp_path / "cut"
    for k in (2, 4):  # killed twice: mid first file, then in the second file
        with pytest.raises(Stop):
            convert_obj36([a, b], out, chunk_rows=2, progress=False, after_chunk=_stop_at(k))
        assert not out.exists()  # atomic: nothing under the final name
        assert (tmp_path / "cut.partial" / "progress.json").is_file()
    convert_obj36([a, b], out, chunk_rows=2, progress=False)
    assert not (tmp_path / "cut.partial").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    _same(_arrays(straight), _arrays(out))


def test_resume_verifies_chunks_and_redoes_a_damaged_one(tmp_path):
    path = tmp_path / "a.tsv"
    write_obj36_tsv(path, IMAGES, dim=DIM)
    straight = convert_obj36([path], tmp_path / "straight", chunk_rows=1, progress=False)
    out = tmp_path / "cut"
    with pytest.raises(Stop):
        convert_obj36([path], out, chunk_rows=1, progress=False, after_chunk=_stop_at(4))
    part = tmp_path / "cut.partial" / "features.npy.part"
    data = bytearray(part.read_bytes())
    data[len(data) - DIM * 36 * 2 * 2] ^= 0xFF  # flip a byte in the third image's features
    part.write_bytes(bytes(data) + b"\x01\x02")  # and a torn write after the last chunk
    seen = []
    convert_obj36([path], out, chunk_rows=1, progress=False, after_chunk=seen.append)
    assert seen == [3, 4, 5]  # chunks 3 and 4 were converted again, chunks 1 and 2 kept
    _same(_arrays(straight), _arrays(out))


def test_killed_during_the_first_chunk_starts_afresh(tmp_path):
    path = tmp_path / "a.tsv"
    write_obj36_tsv(path, IMAGES, dim=DIM)
    straight = convert_obj36([path], tmp_path / "straight", chunk_rows=2, progress=False)
    out = tmp_path / "cut"
    with pytest.raises(Stop):
        convert_obj36([path], out, chunk_rows=2, progress=False, after_chunk=_stop_at(2))
    progress = tmp_path / "cut.partial" / "progress.json"  # data written, chunk not recorded
    progress.write_text(
        json.dumps(json.loads(progress.read_text()) | {"chunks": [], "feature_dim": None})
    )
    convert_obj36([path], out, chunk_rows=2, progress=False)
    _same(_arrays(straight), _arrays(out))


def test_other_inputs_never_mix_with_a_partial_or_finished_store(tsv, tmp_path):
    path, _ = tsv
    out = tmp_path / "s"
    with pytest.raises(Stop):
        convert_obj36([path], out, chunk_rows=2, progress=False, after_chunk=_stop_at(2))
    with pytest.raises(ValueError, match="unfinished conversion of other inputs.*dtype"):
        convert_obj36([path], out, dtype="float32", progress=False)
    convert_obj36([path], out, chunk_rows=2, progress=False)
    mtime = (out / "regions.json").stat().st_mtime_ns
    convert_obj36([path], out, progress=False)  # already done: nothing rewritten
    assert (out / "regions.json").stat().st_mtime_ns == mtime
    with pytest.raises(FileExistsError, match="choose another --out, or delete it"):
        convert_obj36([path], out, max_boxes=40, progress=False)


def test_input_errors(tsv, tmp_path):
    path, _ = tsv
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        convert_obj36([path, tmp_path / "missing.tsv"], tmp_path / "s", progress=False)
    with pytest.raises(RegionFileError, match="36 regions, more than max_boxes=20.*--max-boxes 36"):
        convert_obj36([path], tmp_path / "s", max_boxes=20, progress=False)
    dup = tmp_path / "dup.tsv"
    dup.write_text(path.read_text() + path.read_text().splitlines(keepends=True)[1])
    with pytest.raises(
        ValueError, match=r"line 6: image 'COCO_val2014_000000000042' appears twice"
    ):
        convert_obj36([dup], tmp_path / "d", progress=False)
    other_dim = tmp_path / "dim.tsv"
    write_obj36_tsv(other_dim, IMAGES[:1], dim=DIM * 2)
    with pytest.raises(RegionFileError, match="128 values per region, the earlier rows have 64"):
        convert_obj36([path, other_dim], tmp_path / "m", progress=False)


def test_store_problem_existence_checks(tsv, tmp_path):
    path, _ = tsv
    assert store_problem(tmp_path / "nothing") == "does not exist"
    (tmp_path / "empty").mkdir()
    assert store_problem(tmp_path / "empty").startswith("holds no region store (a store has")
    (tmp_path / "half.partial").mkdir()
    assert store_problem(tmp_path / "half").startswith(
        f"is unfinished: a conversion was started in {str(tmp_path / 'half.partial')!r}"
    )
    with pytest.raises(FileNotFoundError, match=r"'.*half' is unfinished.*rerun the same"):
        RegionStore(tmp_path / "half")
    assert store_problem(convert_obj36([path], tmp_path / "s", progress=False)) is None


def test_store_errors_and_pickling(tsv, tmp_path):
    path, _ = tsv
    with pytest.raises(FileNotFoundError, match="python -m vlcompress prepare"):
        RegionStore(tmp_path / "nothing")
    out = convert_obj36([path], tmp_path / "s", progress=False)
    store = RegionStore(out)
    store.batch([0])
    clone = pickle.loads(pickle.dumps(store))
    assert clone._arrays is None and len(pickle.dumps(store)) < 10_000  # no feature data
    torch.testing.assert_close(clone.batch([2])[0], store.batch([2])[0])
    assert store.missing(["COCO_val2014_000000000001", IMAGES[0][0]]) == [
        "COCO_val2014_000000000001"
    ]
    with pytest.raises(KeyError, match="has no image 'nope'"):
        store.rows(["nope"])
    with (out / "boxes.npy").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match="damaged: boxes.npy has 1000 bytes"):
        RegionStore(out)


def test_prepare_command(tsv, tmp_path, capsys):
    path, _ = tsv
    out = tmp_path / "regions"
    assert main(["prepare", "vqa_cp_v2", "--tsv", str(path), "--out", str(out)]) == 0
    assert len(RegionStore(out)) == 5
    assert main(["prepare", "easy_vqa", "--tsv", str(path), "--out", str(out)]) == 2
    assert "has no region features to prepare" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("x\t1\n")
    assert main(["prepare", "vqa_v2", "--tsv", str(bad), "--out", str(tmp_path / "b")]) == 1
    assert "line 1, field 'row'" in capsys.readouterr().err
