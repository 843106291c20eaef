"""Pretrained backbones: ``experiments/backbones/<name>`` runs into ``<backbones dir>/<name>``,
``make backbones`` trains the unfinished ones and skips finished ones, ``init_from:
backbone:<name>`` starts a later run from it, and a missing or unknown backbone fails naming
the command that builds it."""

from __future__ import annotations

import json
import shutil

import pytest
from quick_run import TINY_RUN

from vlcompress.backbones import (
    backbone_names,
    backbone_status,
    build_backbones,
    resolve_backbone,
)
from vlcompress.cli import main
from vlcompress.config import ConfigError, experiments_dir, load_experiment
from vlcompress.run import resolve_output_dir, run_experiment

TINY_BACKBONE = """\
defaults: [default]
description: a backbone of a few batches (test)
model:
  name: mcan_tiny
  options: {visual_input: grid, grid_channels: [8, 8, 16, 16], grid_cells: 16}
progress_bar: false
data: {options: {batch_size: 32, eval_batch_size: 256}}
scheduler: {name: none}
trainer:
  max_epochs: 1
  max_time: null
  limit_train_batches: 6
  limit_val_batches: 2
  limit_test_batches: 2
  log_every_n_steps: 2
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of the experiments with one tiny backbone recipe; backbones under tmp_path."""
    exps = tmp_path / "experiments"
    shutil.copytree(experiments_dir(), exps)
    (exps / "backbones").mkdir(exist_ok=True)
    (exps / "backbones" / "tiny.yaml").write_text(TINY_BACKBONE)
    monkeypatch.setenv("VLCOMPRESS_EXPERIMENTS", str(exps))
    monkeypatch.setenv("VLCOMPRESS_BACKBONES", str(tmp_path / "backbones"))
    return tmp_path


def test_build_skip_and_start_from_a_backbone(project, capsys, monkeypatch):
    assert "tiny" in backbone_names()
    cfg, _ = load_experiment("backbones/tiny")
    assert resolve_output_dir(cfg) == project / "backbones" / "tiny"
    assert backbone_status("tiny").state == "missing"
    with pytest.raises(ConfigError, match=r"backbone 'tiny' is not built yet .*make backbones"):
        resolve_backbone("backbone:tiny")

    assert build_backbones(["tiny"]) == [("tiny", "trained")]
    st = backbone_status("tiny")
    assert st.state == "finished" and st.folder == project / "backbones" / "tiny"
    row = st.row()
    assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["balanced_accuracy"] <= 1.0
    assert row["prior_baseline"] == pytest.approx(0.6025, abs=1e-3)
    assert row["blind_balanced_baseline"] == pytest.approx(0.3758, abs=1e-3)
    assert isinstance(row["answers_without_image"], bool)
    assert build_backbones(["tiny"]) == [("tiny", "finished before")]  # nothing runs again

    # A later experiment names it; init_from resolves to the backbone's best checkpoint.
    cfg, raw = load_experiment(
        "default", [*TINY_RUN, "trainer.max_epochs=1", "init_from=backbone:tiny",
                    f"output_dir={project / 'stage2'}"],
    )  # fmt: skip
    results = run_experiment(cfg, raw)
    best = json.loads((st.folder / "results.json").read_text())["best_checkpoint"]
    assert results["init_from"]["path"] == str(st.folder / "checkpoints" / best.split("/")[-1])
    assert "model" in results["init_from"]["loaded"]

    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: every cell whole
    assert main(["backbones", "--list"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "tiny" in x)
    assert "finished" in line and f"{row['accuracy']:.3f}" in line and "0.603 / 0.376" in line


def test_interrupted_backbone_resumes_and_unknown_names_fail(project):
    folder = project / "backbones" / "tiny" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"")
    (folder.parent / "run.json").write_text(json.dumps({"status": "interrupted"}))
    assert backbone_status("tiny").state == "unfinished"
    assert build_backbones(["tiny"], dry_run=True) == [("tiny", "would resume")]
    with pytest.raises(ConfigError, match="no backbone recipe 'tyni'.*Did you mean tiny"):
        resolve_backbone("backbone:tyni")
    with pytest.raises(ConfigError, match="no backbone recipe 'nope'"):
        build_backbones(["nope"])
    assert main(["backbones", "nope"]) == 2


def test_a_backbone_that_starts_from_another_is_built_after_it(project):
    exps = project / "experiments" / "backbones"
    on = "defaults: [backbones/tiny]\noutput_dir: null\ninit_from: backbone:{}\n"
    (exps / "tiny_deeper.yaml").write_text(
        on.format("tiny") + "init_grow: true\n"
        "model: {options: {num_layers: 3, zero_init_residual: true}}\n"
    )
    assert build_backbones(["tiny_deeper"], dry_run=True) == [
        ("tiny", "would train"), ("tiny_deeper", "would train"),
    ]  # fmt: skip
    assert build_backbones(["tiny_deeper"]) == [("tiny", "trained"), ("tiny_deeper", "trained")]
    results = backbone_status("tiny_deeper").results
    assert results["init_from"]["loaded"][1:] == [  # the default's one layer per stack
        "grown decoder 1->3 (into layers [2])", "grown encoder 1->3 (into layers [0])",
    ]  # fmt: skip
    (exps / "broken.yaml").write_text(  # fails when it runs: its init_from does not exist
        "defaults: [backbones/tiny]\noutput_dir: null\ninit_from: /nonexistent/x.ckpt\n"
    )
    (exps / "after_broken.yaml").write_text(on.format("broken"))
    assert build_backbones(["after_broken"]) == [
        ("broken", "failed (exit 2)"), ("after_broken", "not run (needs broken)"),
    ]  # fmt: skip
    (exps / "loop_a.yaml").write_text(on.format("loop_b"))
    (exps / "loop_b.yaml").write_text(on.format("loop_a"))
    with pytest.raises(ConfigError, match="cycle: loop_a -> loop_b -> loop_a"):
        build_backbones(["loop_a"], dry_run=True)
    (exps / "orphan.yaml").write_text(on.format("gone"))
    with pytest.raises(ConfigError, match="'orphan' starts from backbone 'gone', which has no"):
        build_backbones(["orphan"], dry_run=True)


TINY_VILT_BACKBONE = """\
defaults: [vilt_mini_easy_vqa]
description: a ViLT backbone of a few batches (test)
model: {name: vilt_tiny}
progress_bar: false
data: {options: {text_encoding: wordpiece, batch_size: 32, eval_batch_size: 256}}
scheduler: {name: none}
trainer:
  max_epochs: 1
  limit_train_batches: 4
  limit_val_batches: 2
  limit_test_batches: 2
  val_check_interval: 1.0
"""


def test_a_vilt_backbone_is_saved_in_the_dandelin_layout_and_loads_by_name(project):
    """A backbone run of a model with its own published layout writes it to <run>/pretrained;
    ``model.options.pretrained: backbone:<name>`` loads it through the model's loader (a new
    head for another answer set, here the pairs' True / False)."""
    import torch
    from safetensors.torch import load_file

    exps = project / "experiments" / "backbones"
    (exps / "vilt_tiny.yaml").write_text(TINY_VILT_BACKBONE)
    assert build_backbones(["vilt_tiny"]) == [("vilt_tiny", "trained")]
    folder = project / "backbones" / "vilt_tiny" / "pretrained"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vilt" and config["hidden_size"] == 32
    saved = load_file(str(folder / "model.safetensors"))
    assert "vilt.encoder.layer.1.output.dense.weight" in saved and "classifier.3.weight" in saved
    cfg, raw = load_experiment(
        "vilt_mini_easy_pairs",
        ["model.name=vilt_tiny", "model.options={head: pair, pretrained: 'backbone:vilt_tiny'}",
         "data.options.num_train=200", "data.options.num_test=40", "progress_bar=false",
         "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         f"output_dir={project / 'pairs'}"],
    )  # fmt: skip
    from vlcompress.run import build_datamodule, build_task

    task = build_task(cfg, build_datamodule(cfg.data, 0))
    body = task.model.vilt.state_dict()
    assert torch.equal(body["encoder.layer.1.output.dense.weight"],
                       saved["vilt.encoder.layer.1.output.dense.weight"])  # fmt: skip
    types = body["embeddings.token_type_embeddings.weight"]  # grown for the second image
    assert types.shape[0] == 3 and torch.equal(types[2], types[1])
    from vlcompress.preflight import preflight

    cfg, _ = load_experiment(
        "vilt_mini_easy_pairs",
        ["model.options.pretrained=backbone:nope", "model.options.language_init=random"],
    )
    assert any("no backbone recipe 'nope'" in p for p in preflight(cfg))


def test_backbone_paths_only_where_a_model_loads_its_published_layout():
    from vlcompress.preflight import preflight

    cfg, _ = load_experiment(
        "uniter_mini_effnet_easy_vqa",
        ["model.options.pretrained=backbone:x", "model.options.language_init=random"],
    )
    assert any("only options that load a model's published layout" in p for p in preflight(cfg))
