"""Packaging: callbacks/ and datamodules/ install as vlcompress.callbacks / vlcompress.datamodules
only, the wheel holds every package and the experiments, and an installed wheel works on its own
(a fresh virtual environment, no editable finder, no source tree on the path)."""

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders of the source tree and where their files land in the wheel.
WHEEL_DIRS = {
    "vlcompress": "vlcompress",
    "callbacks": "vlcompress/callbacks",
    "datamodules": "vlcompress/datamodules",
}
# What not to copy into the build folder (caches, environments, build outputs, runs).
BUILD_IGNORE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "runs",
    ".cache",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
)


def _run(cmd, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def _describe(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[Path, Path]:
    """(wheel, source copy): the wheel is built from a copy of the working tree, so that a stale
    ``build/`` folder cannot leak deleted files into it and concurrent builds do not collide."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=BUILD_IGNORE, symlinks=True)
    proc = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            work / "dist",
            src,
        ]
    )
    assert proc.returncode == 0, f"pip wheel failed: {_describe(proc)}"
    (wheel,) = (work / "dist").glob("vlcompress-*.whl")
    return wheel, src


@pytest.fixture(scope="module")
def wheel_names(wheel_build) -> set[str]:
    return set(zipfile.ZipFile(wheel_build[0]).namelist())


@dataclass
class Installed:
    venv: Path
    python: Path
    script: Path  # the `vlcompress` console script
    cwd: Path  # an empty folder: no ./experiments, no source tree
    env: dict[str, str]

    def run(self, *args, timeout=300) -> subprocess.CompletedProcess:
        return _run(args, timeout=timeout, cwd=self.cwd, env=self.env)


@pytest.fixture(scope="module")
def installed(wheel_build, tmp_path_factory) -> Installed:
    """The wheel installed (``--no-deps``) into a fresh virtual environment.

    The dependencies come from this interpreter's site-packages, listed in a ``.pth`` file of the
    fresh venv: a ``.pth`` line puts a folder on ``sys.path`` but the ``.pth`` files *inside*
    that folder are not processed, so the editable finder of the development install
    (``__editable__.vlcompress-*.pth``) stays inactive.
    """
    base = tmp_path_factory.mktemp("installed")
    venv = base / "venv"
    proc = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert proc.returncode == 0, f"venv creation failed: {_describe(proc)}"
    python = venv / "bin" / "python"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")
        and not k.startswith("VLCOMPRESS_")
    }
    env.update(PYTHONNOUSERSITE="1", MPLBACKEND="Agg", PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], env=env)
    assert proc.returncode == 0, _describe(proc)
    fresh_site = Path(proc.stdout.strip())
    deps = [
        p
        for p in dict.fromkeys(
            [sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()]
        )
        if os.path.isdir(p) and Path(p).resolve() != fresh_site.resolve()
    ]
    (fresh_site / "_vlcompress_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    # pip itself comes from the dependency folders; --ignore-installed: the development
    # install's vlcompress is visible there too and must be neither uninstalled nor reused.
    proc = _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            wheel_build[0],
        ],
        env=env,
    )
    assert proc.returncode == 0, f"pip install of the wheel failed: {_describe(proc)}"
    cwd = base / "empty"
    cwd.mkdir()
    return Installed(venv, python, venv / "bin" / "vlcompress", cwd, env)


# Imports every module of the installed package (except __main__, which runs the CLI) and
# reports, as JSON on the last line, what was imported, what failed and where things came from.
IMPORT_ALL = r"""
import importlib, importlib.resources, importlib.util, json, pkgutil, sys, traceback

report = {"imported": [], "failed": {}}
try:
    import vlcompress
except BaseException:
    report["failed"]["vlcompress"] = traceback.format_exc()
else:
    names = {"vlcompress"}
    def onerror(name):
        names.add(name)
    for info in pkgutil.walk_packages(vlcompress.__path__, "vlcompress.", onerror=onerror):
        names.add(info.name)
    for name in sorted(names):
        if name.rpartition(".")[2] == "__main__":
            continue
        try:
            importlib.import_module(name)
        except BaseException as e:
            report["failed"][name] = "".join(traceback.format_exception_only(type(e), e)).strip()
        else:
            report["imported"].append(name)
    report["files"] = {
        name: getattr(sys.modules.get(name), "__file__", None)
        for name in ("vlcompress", "vlcompress.callbacks", "vlcompress.datamodules")
    }
    experiments = importlib.resources.files("vlcompress") / "experiments"
    report["default_yaml"] = (experiments / "default.yaml").is_file()
report["bare"] = [n for n in ("callbacks", "datamodules") if importlib.util.find_spec(n)]
report["sys_path"] = sys.path
report["editable"] = sorted(
    {m for m in sys.modules if "__editable__" in m}
    | {repr(f) for f in sys.meta_path if "__editable__" in repr(f) + repr(type(f))}
)
print("\n" + json.dumps(report))
"""


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


def test_wheel_maps_folders_into_vlcompress(wheel_names):
    assert "vlcompress/callbacks/finite_loss_guard.py" in wheel_names
    assert "vlcompress/datamodules/easy_vqa.py" in wheel_names
    assert not any(n.startswith(("callbacks/", "datamodules/")) for n in wheel_names)


def test_wheel_holds_every_source_file_and_experiment(wheel_build, wheel_names):
    """Every .py file of the package folders (subpackages included, found by discovery, not by
    a hand-written list) and every experiment YAML is in the wheel, under its installed name."""
    src = wheel_build[1]
    expected = {
        f"{target}/{p.relative_to(src / folder).as_posix()}"
        for folder, target in WHEEL_DIRS.items()
        for p in (src / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    expected |= {
        f"vlcompress/experiments/{p.relative_to(src / 'experiments').as_posix()}"
        for p in (src / "experiments").rglob("*.yaml")
    }
    assert {"vlcompress/kernels/__init__.py", "vlcompress/experiments/default.yaml"} <= expected
    assert "vlcompress/experiments/base/train.yaml" in expected
    missing = sorted(expected - wheel_names)
    assert not missing, (
        f"{len(missing)} file(s) of the source tree are not in the wheel (a folder without "
        f"__init__.py is not discovered as a package): {missing}"
    )
    bare = sorted(n for n in wheel_names if not n.startswith(("vlcompress/", "vlcompress-")))
    assert not bare, f"files outside vlcompress/ in the wheel: {bare}"


def test_installed_wheel_imports_every_module(installed):
    proc = installed.run(installed.python, "-c", IMPORT_ALL)
    assert proc.returncode == 0 and proc.stdout.strip(), _describe(proc)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    venv = installed.venv.resolve()
    assert not report["failed"], "modules that fail to import from the installed wheel:\n" + (
        "\n".join(f"  {name}: {err}" for name, err in report["failed"].items())
    )
    assert not report["editable"], f"the editable finder is active: {report['editable']}"
    assert not report["bare"], f"importable as bare top-level names: {report['bare']}"
    on_path = {Path(entry or installed.cwd).resolve() for entry in report["sys_path"]}
    assert ROOT not in on_path, f"the source tree is on sys.path: {report['sys_path']}"
    for name, file in report["files"].items():
        assert file and venv in Path(file).resolve().parents, (
            f"{name} imported from {file}, not from the fresh venv {venv}"
        )
    assert {"vlcompress.callbacks", "vlcompress.datamodules", "vlcompress.kernels"} <= set(
        report["imported"]
    )
    assert report["default_yaml"], "vlcompress/experiments/default.yaml is not installed"
    print(f"\nimported {len(report['imported'])} modules from the installed wheel")


def test_installed_cli_lists_and_validates_default(installed):
    proc = installed.run(installed.script, "list")
    assert proc.returncode == 0, _describe(proc)
    names = proc.stdout.split()
    print(f"\n$ vlcompress list\n{proc.stdout.rstrip()}")
    assert "default" in names, f"`vlcompress list` does not list default: {_describe(proc)}"
    assert not any(n.startswith("base") for n in names), names

    proc = installed.run(installed.script, "validate", "default")
    print(f"$ vlcompress validate default\n{proc.stdout.rstrip()}")
    assert proc.returncode == 0, _describe(proc)

    proc = installed.run(installed.python, "-m", "vlcompress", "list")
    assert proc.returncode == 0 and proc.stdout.split() == names, _describe(proc)
