"""``missing_inputs``: every registered data module reports all missing inputs at once, one line
each, naming the option (and the environment variable the shipped experiments read), each
expected file once; ``prepare_data`` / ``setup`` raise the same lines as one error. A module
with an ``image_dir`` (nlvr2) reports that folder on its own line."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from fixtures_gqa import prepare_gqa
from fixtures_nlvr2 import write_nlvr2
from fixtures_vqa import prepared_benchmark, write_vqa_v2

from vlcompress import registry
from vlcompress.config import list_experiments, load_experiment
from vlcompress.data.vqa_files import MissingInputsError
from vlcompress.utils.assets import minilm_package_dir


class Inputs(NamedTuple):
    """What a data module reads: the environment variable the shipped experiments read
    ``data_dir`` from, the files in ``data_dir``, whether it reads a region store, the folders it
    expects in ``image_dir`` (none: no ``image_dir``), and whether its data ships with a package
    (``data_dir`` may stay unset)."""

    env: str | None
    files: list[str]
    store: bool
    images: tuple[str, ...] = ()
    packaged: bool = False


EASY_VQA = Inputs(
    None,
    ["answers.txt", "train/questions.json", "test/questions.json", "train/images/",
     "test/images/"],
    False,
    packaged=True,
)  # fmt: skip
EXPECTED = {
    "easy_vqa": EASY_VQA,
    "easy_pairs": EASY_VQA,  # pairs of easy-VQA's own images: the same inputs
    "vqa_v2": Inputs(
        "VQA_DIR",
        ["v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
         "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"],
        True,
    ),
    "vqa_cp_v2": Inputs(
        "VQACP_DIR",
        ["vqacp_v2_train_questions.json", "vqacp_v2_train_annotations.json",
         "vqacp_v2_test_questions.json", "vqacp_v2_test_annotations.json"],
        True,
    ),
    "gqa": Inputs(
        "GQA_DIR",
        ["train_balanced_questions.json", "val_balanced_questions.json",
         "testdev_balanced_questions.json"],
        True,
    ),
    "nlvr2": Inputs(None, ["train.json", "dev.json", "test1.json"], False,
                    images=("images/train/", "dev/", "test1/")),
}  # fmt: skip
KNOWN_REPEATS: dict[str, Any] = {}
EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
ENV_VARS = ("VQA_DIR", "VQACP_DIR", "GQA_DIR", "CLIP_GRID_DIR", "BERT_UNCASED_DIR",
            "BERT_CASED_DIR", "LXMERT_DIR", "CLIP_RN50", "UNITER_CKPT")  # fmt: skip


def missing(name: str, **values) -> list[str]:
    component = registry.get("datamodule", name)
    return component.builder.missing_inputs(component.make_options(values))


def write_easy_vqa(folder: Path) -> Path:
    """An easy-VQA folder of the right shape (empty files: only existence is checked)."""
    for part in ("train", "test"):
        (folder / part / "images").mkdir(parents=True)
        (folder / part / "questions.json").write_text("[]")
    (folder / "answers.txt").write_text("yes\n")
    return folder


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> dict[str, Path]:
    """A complete data folder (files and region store) per data module."""
    root = tmp_path_factory.mktemp("complete")
    out = {"easy_vqa": write_easy_vqa(root / "easy_vqa")}
    out["easy_pairs"] = out["easy_vqa"]
    for name in ("vqa_v2", "vqa_cp_v2"):
        out[name] = prepared_benchmark(root / name, name, dim=8)["data_dir"]
    out["gqa"] = prepare_gqa(root / "gqa")["data_dir"]
    write_nlvr2(root / "nlvr2")
    out["nlvr2"] = root / "nlvr2" / "data"
    return out


def complete_options(name: str, complete: dict[str, Path]) -> dict[str, str]:
    """Options naming ``name``'s complete inputs (``data_dir``, and ``image_dir`` if read)."""
    options = {"data_dir": str(complete[name])}
    if EXPECTED[name].images:
        options["image_dir"] = str(complete[name].parent / "images")  # write_nlvr2's layout
    return options


def test_every_registered_data_module_checks_its_inputs():
    modules = registry.components("datamodule")
    assert set(modules) == set(EXPECTED), "add the new data module to EXPECTED"
    for component in modules.values():
        assert callable(getattr(component.builder, "missing_inputs", None)), component.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_data_dir_lists_every_problem_once(name, tmp_path):
    env, files, store, images, _ = EXPECTED[name]
    data_dir = tmp_path / "nope"
    lines = missing(name, data_dir=str(data_dir))
    assert len(lines) == 1 + store + bool(images)
    assert lines[0].startswith(f"data.options.data_dir: {str(data_dir)!r} does not exist; set it")
    assert all(f in lines[0] for f in files)
    if env:
        assert f"export {env}=<folder>" in lines[0]
    if store:
        out = data_dir / "regions_obj36"
        assert lines[1].startswith("data.options.regions_dir (unset: <data_dir>/regions_obj36)")
        assert f"python -m vlcompress prepare {name} --tsv " in lines[1]
        assert f"--out {out}`" in lines[1]
    if images:  # image_dir is unset: its own line, naming the folders it must hold
        assert lines[-1].startswith(
            f"data.options.image_dir is not set; set it to the folder holding {', '.join(images)}"
        )
        assert not any("image_dir" in line for line in lines[:-1])
    # the module's own checks raise the same lines, all at once
    dm = registry.build("datamodule", name, {"data_dir": str(data_dir)}, seed=0)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as e:
            step()
        assert isinstance(e.value, MissingInputsError) and e.value.problems == lines
        message = str(e.value)
        assert all(line in message for line in lines)
        if name not in KNOWN_REPEATS:
            for f in files:
                assert message.count(f) == 1, f"{f} appears {message.count(f)} times:\n{message}"


def missing_inputs_error(name: str, step: str, **options) -> MissingInputsError:
    """The error ``prepare_data`` or ``setup`` raises for ``options``."""
    dm = registry.build("datamodule", name, options, seed=0)
    with pytest.raises(FileNotFoundError) as e:
        getattr(dm, step)()
    assert isinstance(e.value, MissingInputsError), type(e.value)
    return e.value


@pytest.mark.parametrize(
    "name,data_dir",
    [pytest.param(n, d, marks=KNOWN_REPEATS.get(n, ())) for n in sorted(EXPECTED)
     for d in ("absent", "unset") if d == "absent" or not EXPECTED[n].packaged],
)  # fmt: skip
def test_each_expected_name_appears_once(name, data_dir, tmp_path):
    """Each expected file (and ``image_dir`` folder) appears once in the error: the hints on
    how to obtain them do not list them again. (An unset data_dir of a packaged module is the
    package's data: nothing is missing.)"""
    inputs = EXPECTED[name]
    options = {"data_dir": str(tmp_path / "nope")} if data_dir == "absent" else {}
    message = str(missing_inputs_error(name, "setup", **options))
    for f in [*inputs.files, *inputs.images]:
        assert message.count(f) == 1, f"{f} appears {message.count(f)} times:\n{message}"


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=()) for n in sorted(EXPECTED)],
)
def test_the_error_names_the_module(name, tmp_path):
    """The error starts with the registered name of the module that raised it."""
    for step in ("prepare_data", "setup"):
        error = missing_inputs_error(name, step, data_dir=str(tmp_path / "nope"))
        assert error.component == name and str(error).startswith(f"{name}: ")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_complete_folder_has_no_problems(name, complete):
    assert missing(name, **complete_options(name, complete)) == []


def test_unset_data_dirs(tmp_path):
    for name in ("easy_vqa", "easy_pairs"):
        start = time.perf_counter()
        assert missing(name) == []  # the easy-vqa package's data
        assert time.perf_counter() - start < 0.5
    for name in ("vqa_v2", "vqa_cp_v2", "gqa"):
        env, files, *_ = EXPECTED[name]
        lines = missing(name)
        assert len(lines) == 2, lines
        assert lines[0].startswith("data.options.data_dir is not set; set it to the folder holding")
        assert f"export {env}=<folder>" in lines[0]
        assert all(lines[0].count(f) == 1 for f in files)
        assert "--out <data_dir>/regions_obj36`" in lines[1]
    files, images = EXPECTED["nlvr2"].files, EXPECTED["nlvr2"].images
    lines = missing("nlvr2")
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f"data.options.data_dir is not set; set it to the folder holding {', '.join(files)}. "
    )
    assert lines[1].startswith(
        f"data.options.image_dir is not set; set it to the folder holding {', '.join(images)}. "
    )
    assert "https://github.com/lil-lab/nlvr" in lines[0] and "request them" in lines[1]


def test_partial_folder_names_only_what_is_missing(tmp_path):
    write_vqa_v2(tmp_path)
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").unlink()
    (tmp_path / "v2_mscoco_val2014_annotations.json").unlink()
    (tmp_path / "regions_obj36.partial").mkdir()
    data_dir, store = str(tmp_path), tmp_path / "regions_obj36"
    lines = missing("vqa_v2", data_dir=data_dir)
    assert lines[0].startswith(
        f"data.options.data_dir: {data_dir!r} lacks v2_OpenEnded_mscoco_val2014_questions.json, "
        "v2_mscoco_val2014_annotations.json (its other 2 expected file(s) are there)."
    )
    assert "train2014" not in lines[0] and "VQA_DIR" not in lines[0]
    assert f"{str(store)!r} is unfinished: a conversion was started in" in lines[1]
    assert len(lines) == 2


def test_gqa_checks_the_files_its_options_read(tmp_path):
    lines = missing("gqa", data_dir=str(tmp_path), val_source="train", test_questions="sub.json")
    assert "lacks train_balanced_questions.json, sub.json." in lines[0]
    assert "val_balanced_questions.json" not in lines[0]  # val_source: train does not read it


def test_region_store_and_tokenizer_options(tmp_path, complete):
    folder = tmp_path / "empty_tokenizer"
    folder.mkdir()
    lines = missing(
        "vqa_v2",
        data_dir=str(complete["vqa_v2"]),
        regions_dir="/path/to/vqa_v2/clip_rn50_grid",
        text_encoding="wordpiece",
        tokenizer=str(folder),
    )
    assert lines == [
        lines[0],
        f"data.options.tokenizer: {str(folder)!r} holds neither vocab.txt nor tokenizer.json; "
        "set it to a local Hugging Face WordPiece tokenizer folder (vocab.txt or tokenizer.json), "
        "e.g. the pretrained model's.",
    ]
    assert lines[0].startswith(
        "data.options.regions_dir: '/path/to/vqa_v2/clip_rn50_grid' does not exist (a placeholder?)"
    )
    assert "prepare clip-grid" in lines[0] and "--out /path/to/vqa_v2/clip_rn50_grid`" in lines[0]
    assert "data_dir" not in lines[0]
    store = complete["vqa_v2"] / "regions_obj36"
    ok = {
        "regions_dir": str(store),
        "text_encoding": "wordpiece",
        "tokenizer": str(minilm_package_dir("")),
    }
    assert missing("vqa_cp_v2", data_dir=str(complete["vqa_cp_v2"]), **ok) == []
    assert missing("easy_vqa", text_encoding="wordpiece") == []  # the packaged vocabulary
    lines = missing("easy_vqa", text_encoding="wordpiece", tokenizer="/path/to/bert")
    assert lines == [
        "data.options.tokenizer: '/path/to/bert' does not exist (a placeholder?); set it to a "
        "local Hugging Face WordPiece tokenizer folder (vocab.txt or tokenizer.json), e.g. the "
        "pretrained model's."
    ]


def test_existence_only_nothing_is_read(tmp_path):
    """Damaged files pass (reading them is set-up's job): the check stays cheap."""
    for name in EXPECTED["vqa_cp_v2"].files:
        (tmp_path / name).write_text("{not json")
    (tmp_path / "regions_obj36").mkdir()
    (tmp_path / "regions_obj36" / "regions.json").write_text("{not json")
    assert missing("vqa_cp_v2", data_dir=str(tmp_path)) == []


def test_error_is_one_line_per_problem_and_picklable(tmp_path):
    lines = missing("gqa", data_dir=str(tmp_path / "x"))
    error = MissingInputsError("gqa", lines)
    assert str(error) == "gqa: 2 problems with the data inputs:\n  - " + "\n  - ".join(lines)
    assert str(MissingInputsError("gqa", lines[:1])) == f"gqa: {lines[0]}"
    clone = pickle.loads(pickle.dumps(error))
    assert isinstance(clone, FileNotFoundError) and clone.problems == lines
    assert str(clone) == str(error)


def test_shipped_experiments_placeholders_are_caught(monkeypatch):
    """With the environment variables unset, every shipped experiment on VQA v2 / VQA-CP / GQA
    has problems naming its variable; the easy-VQA and easy-pairs ones have none."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    seen = set()
    for exp in list_experiments():
        cfg, _ = load_experiment(exp)
        name = cfg.data.name
        lines = missing(name, **cfg.data.options)
        env = EXPECTED[name].env
        if EXPECTED[name].packaged:
            assert lines == [], (exp, lines)
            continue
        seen.add(name)
        assert lines, exp
        assert env, f"{exp}: name the variable the shipped experiments read in EXPECTED"
        assert f"export {env}=<folder>" in lines[0], (exp, lines[0])
        text = EXPERIMENTS / f"{exp}.yaml"
        if text.is_file() and f"oc.env:{env}," in text.read_text():
            assert "does not exist (a placeholder?)" in lines[0], (exp, lines[0])
    assert seen == {"vqa_v2", "vqa_cp_v2", "gqa"}


def test_experiment_env_vars_match():
    """The env var each shipped experiment reads data_dir from is the one its module names."""
    pattern = re.compile(r"data_dir: \$\{oc\.env:(\w+),")
    found = {}
    for path in EXPERIMENTS.rglob("*.yaml"):
        m = pattern.search(path.read_text())
        if m:
            cfg, _ = load_experiment(str(path))
            found[cfg.data.name] = found.get(cfg.data.name, set()) | {m.group(1)}
    assert found == {n: {inputs.env} for n, inputs in EXPECTED.items() if inputs.env}


def test_easy_vqa_missing_package_data_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "easy_vqa" else real(n, *a)
    )
    (line,) = missing("easy_vqa")
    assert line.startswith("data.options.data_dir is unset and the `easy-vqa` package")
    assert "`pip install easy-vqa`" in line and line.count("answers.txt") == 1
    assert missing("easy_pairs") == [line]  # the pairs are made of the same images


def test_easy_pairs_reads_what_easy_vqa_reads(tmp_path, complete):
    """easy-pairs has easy-VQA's inputs and checks: the same lines for the same options."""
    partial = write_easy_vqa(tmp_path / "partial")
    (partial / "answers.txt").unlink()
    (partial / "test" / "questions.json").unlink()
    cases = [
        {},
        {"data_dir": str(complete["easy_vqa"])},
        {"data_dir": str(tmp_path / "nope")},
        {"data_dir": "/path/to/easy_vqa"},
        {"data_dir": str(partial)},
        {"text_encoding": "wordpiece", "tokenizer": "/path/to/bert"},
        {"data_dir": str(tmp_path / "nope"), "text_encoding": "wordpiece",
         "tokenizer": str(tmp_path)},
    ]  # fmt: skip
    for options in cases:
        assert missing("easy_pairs", **options) == missing("easy_vqa", **options), options
    (line,) = missing("easy_pairs", data_dir=str(partial))
    assert line.startswith(
        f"data.options.data_dir: {str(partial)!r} lacks answers.txt, test/questions.json (its "
        "other 3 expected file(s) are there)."
    )
    assert len(missing("easy_pairs", data_dir=str(tmp_path / "nope"), text_encoding="wordpiece",
                       tokenizer=str(tmp_path))) == 2  # fmt: skip
    with pytest.raises(ValueError, match="easy_pairs: only split: standard"):
        registry.get("datamodule", "easy_pairs").make_options({"split": "cp"})


def test_nlvr2_needs_both_folders(tmp_path, complete):
    """NLVR2 reads its JSON lines from data_dir and its images from image_dir: each folder is
    checked on its own line, naming only what it lacks."""
    ok = complete_options("nlvr2", complete)
    lines = missing("nlvr2", data_dir=ok["data_dir"])  # image_dir unset
    assert len(lines) == 1 and lines[0].startswith("data.options.image_dir is not set")
    lines = missing("nlvr2", image_dir=ok["image_dir"])  # data_dir unset
    assert len(lines) == 1 and lines[0].startswith("data.options.data_dir is not set")
    lines = missing("nlvr2", data_dir=ok["data_dir"], image_dir="/path/to/nlvr2/images")
    assert lines == [lines[0]] and lines[0].startswith(
        "data.options.image_dir: '/path/to/nlvr2/images' does not exist (a placeholder?); set it "
        "to the folder holding images/train/, dev/, test1/."
    )
    # a partial download: only what is missing, in each folder
    root = tmp_path / "partial"
    write_nlvr2(root)
    (root / "data" / "dev.json").unlink()
    (root / "images" / "test1").rename(root / "images" / "test")
    data_dir, image_dir = str(root / "data"), str(root / "images")
    lines = missing("nlvr2", data_dir=data_dir, image_dir=image_dir)
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        f"data.options.data_dir: {data_dir!r} lacks dev.json (its other 2 expected file(s) are "
        "there). "
    )
    assert "train.json" not in lines[0].split(". ")[0]
    assert lines[1].startswith(
        f"data.options.image_dir: {image_dir!r} lacks test1/ (its other 2 expected file(s) are "
        "there). "
    )
    for step in ("prepare_data", "setup"):
        error = missing_inputs_error("nlvr2", step, data_dir=data_dir, image_dir=image_dir)
        assert error.problems == lines
    # training images directly under image_dir/train/ are accepted
    flat = tmp_path / "flat"
    write_nlvr2(flat, train_folder="train")
    assert missing("nlvr2", data_dir=str(flat / "data"), image_dir=str(flat / "images")) == []
    # and the WordPiece tokenizer (nlvr2's default encoding) is checked too
    lines = missing("nlvr2", **ok, tokenizer="/path/to/bert")
    assert len(lines) == 1 and lines[0].startswith("data.options.tokenizer: '/path/to/bert'")
    assert missing("nlvr2", **ok, text_encoding="words") == []


def test_nlvr2_checks_existence_only(tmp_path):
    """Damaged JSON lines and empty image folders pass (reading them is set-up's job)."""
    for name in EXPECTED["nlvr2"].files:
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / name).write_text("{not json")
    for folder in EXPECTED["nlvr2"].images:
        (tmp_path / "images" / folder).mkdir(parents=True)
    options = {"data_dir": str(tmp_path / "data"), "image_dir": str(tmp_path / "images")}
    assert missing("nlvr2", **options) == []
