"""callbacks/ and datamodules/ install as vlcompress.callbacks / vlcompress.datamodules only."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mapped_packages_import_from_top_level_folders():
    import vlcompress.callbacks
    import vlcompress.datamodules

    assert Path(vlcompress.callbacks.__file__).parent == ROOT / "callbacks"
    assert Path(vlcompress.datamodules.__file__).parent == ROOT / "datamodules"


@pytest.mark.parametrize("bare", ["callbacks", "datamodules"])
def test_not_importable_as_bare_names(bare, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_wheel_maps_folders_into_vlcompress(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("vlcompress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlcompress/callbacks/finite_loss_guard.py" in names
    assert "vlcompress/datamodules/easy_vqa.py" in names
    assert not any(n.startswith(("callbacks/", "datamodules/")) for n in names)
