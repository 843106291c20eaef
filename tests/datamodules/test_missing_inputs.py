"""``missing_inputs``: every registered data module reports all missing inputs at once, one line
each, naming the option (and the environment variable the shipped experiments read), each
expected file once; ``prepare_data`` / ``setup`` raise the same lines as one error."""

from __future__ import annotations

import pickle
import re
import time
from pathlib import Path

import pytest
from fixtures_gqa import prepare_gqa
from fixtures_vqa import prepared_benchmark, write_vqa_v2

from vlcompress import registry
from vlcompress.config import list_experiments, load_experiment
from vlcompress.data.vqa_files import MissingInputsError
from vlcompress.utils.assets import minilm_package_dir

EXPECTED = {  # name -> (environment variable of the shipped experiments, files, region store)
    "easy_vqa": (
        None,
        ["answers.txt", "train/questions.json", "test/questions.json", "train/images/",
         "test/images/"],
        False,
    ),
    "vqa_v2": (
        "VQA_DIR",
        ["v2_OpenEnded_mscoco_train2014_questions.json", "v2_mscoco_train2014_annotations.json",
         "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json"],
        True,
    ),
    "vqa_cp_v2": (
        "VQACP_DIR",
        ["vqacp_v2_train_questions.json", "vqacp_v2_train_annotations.json",
         "vqacp_v2_test_questions.json", "vqacp_v2_test_annotations.json"],
        True,
    ),
    "gqa": (
        "GQA_DIR",
        ["train_balanced_questions.json", "val_balanced_questions.json",
         "testdev_balanced_questions.json"],
        True,
    ),
}  # fmt: skip
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
    for name in ("vqa_v2", "vqa_cp_v2"):
        out[name] = prepared_benchmark(root / name, name, dim=8)["data_dir"]
    out["gqa"] = prepare_gqa(root / "gqa")["data_dir"]
    return out


def test_every_registered_data_module_checks_its_inputs():
    modules = registry.components("datamodule")
    assert set(modules) == set(EXPECTED), "add the new data module to EXPECTED"
    for component in modules.values():
        assert callable(getattr(component.builder, "missing_inputs", None)), component.name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_data_dir_lists_every_problem_once(name, tmp_path):
    env, files, store = EXPECTED[name]
    data_dir = tmp_path / "nope"
    lines = missing(name, data_dir=str(data_dir))
    assert len(lines) == (2 if store else 1)
    assert lines[0].startswith(f"data.options.data_dir: {str(data_dir)!r} does not exist; set it")
    if env:
        assert f"export {env}=<folder>" in lines[0]
    if store:
        out = data_dir / "regions_obj36"
        assert lines[1].startswith("data.options.regions_dir (unset: <data_dir>/regions_obj36)")
        assert f"python -m vlcompress prepare {name} --tsv " in lines[1]
        assert f"--out {out}`" in lines[1]
    # the module's own checks raise the same lines, all at once
    dm = registry.build("datamodule", name, {"data_dir": str(data_dir)}, seed=0)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as e:
            step()
        assert isinstance(e.value, MissingInputsError) and e.value.problems == lines
        message = str(e.value)
        assert all(line in message for line in lines)
        for f in files:
            assert message.count(f) == 1, f"{f} appears {message.count(f)} times:\n{message}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_complete_folder_has_no_problems(name, complete):
    assert missing(name, data_dir=str(complete[name])) == []


def test_unset_data_dirs(tmp_path):
    start = time.perf_counter()
    assert missing("easy_vqa") == []  # the easy-vqa package's data
    assert time.perf_counter() - start < 0.5
    for name in ("vqa_v2", "vqa_cp_v2", "gqa"):
        env, files, _ = EXPECTED[name]
        lines = missing(name)
        assert len(lines) == 2, lines
        assert lines[0].startswith("data.options.data_dir is not set; set it to the folder holding")
        assert f"export {env}=<folder>" in lines[0]
        assert all(lines[0].count(f) == 1 for f in files)
        assert "--out <data_dir>/regions_obj36`" in lines[1]


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
    for name in EXPECTED["vqa_cp_v2"][1]:
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
    has problems naming its variable; the easy-VQA ones have none."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    seen = set()
    for exp in list_experiments():
        cfg, _ = load_experiment(exp)
        name = cfg.data.name
        lines = missing(name, **cfg.data.options)
        env = EXPECTED[name][0]
        if env is None:
            assert lines == [], (exp, lines)
            continue
        seen.add(name)
        assert lines, exp
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
    assert found == {n: {env} for n, (env, _, _) in EXPECTED.items() if env}


def test_easy_vqa_missing_package_data_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "easy_vqa" else real(n, *a)
    )
    (line,) = missing("easy_vqa")
    assert line.startswith("data.options.data_dir is unset and the `easy-vqa` package")
    assert "`pip install easy-vqa`" in line and line.count("answers.txt") == 1
