"""What a new user hits in the first hour (issue 18): one row per scenario.

Each row runs ``python -m vlcompress ...`` in-process and checks the exit code, the one line
the user must see, that no traceback is printed, and optionally what must (not) exist after.
A new scenario is one more row of :data:`SCENARIOS`; ``{tmp}`` in the arguments is the test's
temporary folder, ``{run}`` a finished tiny run made once per session (the default, without
slimmable training), ``{bst}`` a finished tiny slimmable run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from quick_run import TINY_RUN

from vlcompress.cli import main


def _failed_folder(tmp: Path) -> None:
    """A run folder whose run failed before its first checkpoint (as ``run.json`` records)."""
    folder = tmp / "failed"
    folder.mkdir()
    (folder / "config.yaml").write_text("name: default\n")
    (folder / "run.log").write_text("...\n")
    status = {"status": "failed", "error": "FileNotFoundError: no teacher", "history": []}
    (folder / "run.json").write_text(json.dumps(status))


@dataclass(frozen=True)
class Scenario:
    """One thing a user does and what they must see.

    Attributes:
        id: a short name.
        argv: the command line after ``python -m vlcompress``.
        code: the expected exit code.
        line: a line (part) that must appear in what the user sees (stdout, stderr, log).
        prepare: makes the state the scenario starts from, in the temporary folder.
        absent / present: paths (with ``{tmp}``) that must not / must exist afterwards.
        extra: further lines that must appear too.
        never: lines that must not appear (e.g. a problem that is not there).
    """

    id: str
    argv: list[str]
    code: int
    line: str
    prepare: Callable[[Path], None] | None = None
    absent: tuple[str, ...] = ()
    present: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    never: tuple[str, ...] = ()


SCENARIOS = [
    # 1. a run that fails before its first checkpoint no longer locks its folder
    Scenario(
        "resume-a-run-that-never-saved",
        ["train", "default", "output_dir={tmp}/failed", "resume=true"],
        2,
        "holds no checkpoint: its run failed before saving one: FileNotFoundError: no teacher",
        prepare=_failed_folder,
    ),
    Scenario(
        "rerun-a-run-that-never-saved",
        ["train", "default", "output_dir={tmp}/failed", "trainer.max_epochs=1", *TINY_RUN],
        0,
        "failed before its first checkpoint",
        prepare=_failed_folder,
        present=("{tmp}/failed/results.json",),
    ),
    # 8. a run cut by trainer.max_time says so
    Scenario(
        "max-time-cuts-the-run",
        [
            "train",
            "default",
            "output_dir={tmp}/mt",
            "trainer.max_epochs=50",
            "trainer.max_time=00:00:00:02",
            *TINY_RUN,
        ],
        0,
        "stopped by trainer.max_time=00:00:00:02 after",
        extra=("raise trainer.max_time (or set it to null)",),
    ),  # fmt: skip
    Scenario(
        "resume-a-folder-that-does-not-exist",
        ["train", "default", "output_dir={tmp}/nothing", "resume=true"],
        2,
        "the run folder {tmp}/nothing does not exist",
        absent=("{tmp}/nothing",),
    ),
    # 2. / 5. callback problems are found by validate, before any folder is made
    Scenario(
        "structured-pruning-with-nothing-to-prune",
        ["train", "default", "output_dir={tmp}/sp", "callbacks=[{name: structured_pruning}]"],
        2,
        "callbacks[0] (structured_pruning): nothing to prune",
        absent=("{tmp}/sp",),
    ),
    Scenario(
        "structured-pruning-heads-out-of-range",
        ["validate", "default", "callbacks=[{name: structured_pruning, options: {heads: 1.5}}]"],
        2,
        "the fraction of attention heads removed",
    ),
    Scenario(
        "bst-without-its-teacher",
        [
            "train",
            "seed001_bst_mcan_easy_vqa",
            "output_dir={tmp}/bst",
            "callbacks.1.options.teacher={tmp}/no_teacher",
        ],
        2,
        "callbacks[1] (slimmable_training): options.teacher: {tmp}/no_teacher does not exist",
        absent=("{tmp}/bst",),
    ),  # fmt: skip
    Scenario(
        "slimmable-training-on-a-model-without-width-region",
        ["train", "default", "output_dir={tmp}/slim", "callbacks=[{name: slimmable_training}]"],
        2,
        "callbacks[0] (slimmable_training): options.space has widths ['1/4', '1/2', '3/4'] "
        "below 1, but MCAN's anatomy declares no width region",
        absent=("{tmp}/slim",),
        extra=("set width_adapters: true",),
    ),
    Scenario(
        "init-from-a-missing-run",
        ["validate", "default", "init_from=/nope"],
        2,
        "init_from: /nope does not exist",
    ),
    Scenario(
        "placeholder-paths",
        ["validate", "seed000_lxmert_vqa_cp_dense"],
        2,
        "model.options.pretrained: /path/to/lxmert-base-uncased does not exist",
    ),
    # 10. missing data: every problem at once, naming the option and the variable, exit 2
    Scenario(
        "missing-data",
        ["train", "seed000_lxmert_vqa_cp_dense", "output_dir={tmp}/lx"],
        2,
        "data.options.data_dir",
        absent=("{tmp}/lx",),
        extra=("VQACP_DIR", "data.options.regions_dir"),
    ),
    # 12. the command line
    Scenario("help-lists-export", ["--help"], 0, "export", extra=("{train,validate,list",)),
    Scenario(
        "top-level-trainer-key",
        ["validate", "default", "max_epochs=3"],
        2,
        "max_epochs: unknown key; did you mean 'trainer.max_epochs'?",
    ),
    Scenario(
        "every-callback-option-problem-at-once",
        [
            "validate",
            "default",
            "callbacks=[{name: magnitude_pruning, options: {sparsty: 0.5, schedule: cubc}}]",
        ],
        2,
        "callbacks[0].options.sparsty: unknown key; did you mean 'sparsity'?",
        extra=("schedule must be one of",),
    ),  # fmt: skip
    Scenario(
        "a-bad-option-beside-a-cross-field-pair",
        [
            "validate",
            "seed001_bst_mcan_easy_vqa",
            "callbacks.1.options={distill: teacher, teacher: runs/t, space: bogus}",
        ],
        2,
        "unknown submodel space 'bogus'",
        never=("needs teacher",),
    ),  # fmt: skip
    Scenario(
        "model-attr-leading-nowhere",
        [
            "validate",
            "default",
            "callbacks=[{name: magnitude_pruning, options: {model_attr: model.nope}}]",
        ],
        2,
        "model_attr='model.nope': pl_module.model (MCAN) has no attribute 'nope'",
    ),  # fmt: skip
    Scenario(
        "glued-yaml-colon",
        ["validate", "default", "callbacks=[{name:structured_pruning}]"],
        2,
        "a missing space after the colon? write {name: structured_pruning}",
    ),
    Scenario(
        "list-components-whole-sentences",
        ["list", "callback"],
        0,
        "Sandwich training of every (width, depth) submodel of one model, with distillation.",
        extra=("sparsity: float or Mapping = 0.5",),
    ),
]


def _fill(text: str, tmp: Path) -> str:
    return text.replace("{tmp}", str(tmp))


@pytest.mark.parametrize("s", [pytest.param(s, id=s.id) for s in SCENARIOS])
def test_scenario(
    s: Scenario,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command exits with the row's code and shows its line, without a traceback."""
    monkeypatch.setenv("COLUMNS", "200")  # rich tables keep whole sentences on one line
    monkeypatch.chdir(tmp_path)
    if s.prepare:
        s.prepare(tmp_path)
    caplog.set_level(logging.INFO)
    try:
        code = main([_fill(a, tmp_path) for a in s.argv])
    except SystemExit as e:  # argparse's --help
        code = int(e.code or 0)
    out = capsys.readouterr()
    seen = out.out + out.err + caplog.text
    assert code == s.code, seen[-3000:]
    for line in (s.line, *s.extra):
        assert _fill(line, tmp_path) in seen, seen[-3000:]
    for line in ("Traceback", *s.never):
        assert _fill(line, tmp_path) not in seen, seen[-3000:]
    for p in s.absent:
        assert not Path(_fill(p, tmp_path)).exists(), p
    for p in s.present:
        assert Path(_fill(p, tmp_path)).exists(), p
