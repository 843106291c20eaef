"""Seed 002 (DAS) through a vlcompress run on real easy-VQA data: the architecture_skipping
callback searches, skips, reports in results.json and plots its gates; ``export`` writes the
adapted model with the chosen layer removed, which reloads and answers on its own."""

from __future__ import annotations

import json

import torch

from vlcompress.cli import main
from vlcompress.config import load_experiment
from vlcompress.run import run_experiment

SKIP = (
    "callbacks=[{name: architecture_skipping, options: {skip: 1, search_epochs: 1, "
    "warmup_epochs: 0, interval: 2, probes: 2, bottleneck: 4, skip_bottleneck: 4, seed: 0}}]"
)


def test_skipping_run_reports_and_exports(tmp_path, capsys):
    from quick_run import TINY_RUN

    from vlcompress.compress.submodels import ExportedModel

    out = tmp_path / "run"
    overrides = [
        *TINY_RUN,
        "model.options.num_layers=2",
        SKIP,
        f"output_dir={out}",
        "trainer.max_epochs=2",
    ]
    run_experiment(*load_experiment("default", overrides))
    results = json.loads((out / "results.json").read_text())
    rep = results["callbacks"]["ArchitectureSkipping"]
    assert rep["phase"] == "skipping" and len(rep["chosen"]) == 1
    assert rep["arms"] == ["decoder.0", "decoder.1"]  # MCAN's cross-modal layers
    assert rep["gate_updates"] == 3  # 6 steps of epoch 0, every 2nd
    assert rep["macs_per_example"]["skipped"] < rep["macs_per_example"]["full"]
    assert (out / "skipping_gates.png").is_file()

    folder = tmp_path / "export"
    assert (
        main(["export", str(out), "--out", str(folder), "--large-batch", "8", "--repeats", "3"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "skipped" in printed and "CPU latency at batch 8" in printed
    exported = ExportedModel.load(folder)
    state = exported.model.state_dict()
    skipped = rep["chosen"][0]
    assert not any(k.startswith(f"{skipped}.self_attn") for k in state)  # removed for good
    assert any(k.startswith(f"{skipped}.adapters.0.") for k in state)  # its skip adapter
    record = json.loads((folder / "export.json").read_text())
    assert record["reload_max_abs_diff"] < 1e-5
    # the export timed against the full model (no adapters, nothing skipped), interleaved
    assert set(record["latency"]) == {"batch_1", "batch_8"}
    for row in record["latency"].values():
        assert 0 < row["full_p10_ms"] <= row["full_ms"] <= row["full_p90_ms"]
        assert 0 < row["exported_p10_ms"] <= row["exported_ms"] <= row["exported_p90_ms"]
        assert abs(row["ratio"] - row["exported_ms"] / row["full_ms"]) < 1e-3
        assert row["threads"] == torch.get_num_threads()
    assert main(["export", str(out), "--out", str(tmp_path / "x"), "--repeats", "0"]) == 1
    assert "--repeats must be at least 1" in capsys.readouterr().err
    # a search-only run has nothing to export, and says so
    early = tmp_path / "early"
    run_experiment(*load_experiment("default", [*TINY_RUN, "model.options.num_layers=2", SKIP.replace("search_epochs: 1", "search_epochs: 2"), f"output_dir={early}", "trainer.max_epochs=1"]))  # fmt: skip
    assert main(["export", str(early)]) == 1
    assert "search phase" in capsys.readouterr().err
    assert torch.is_tensor(next(iter(state.values())))


def test_skipping_a_vilt_on_image_pairs_exports_a_smaller_model(tmp_path, capsys):
    """DAS on a ViLT pair model (two passes per example) over easy-pairs; the export removes
    the chosen layer and answers as the run's model does."""
    from vlcompress.compress.submodels import ExportedModel

    out = tmp_path / "run"
    overrides = [
        "model.name=vilt_tiny", "model.options={head: pair}", "data.options.text_encoding=words",
        "data.options.num_train=300", "data.options.num_test=60", "optim.lr_scale={}",
        "progress_bar=false", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2", "trainer.val_check_interval=1.0", "scheduler.name=none",
        SKIP, f"output_dir={out}",
    ]  # fmt: skip
    results = run_experiment(*load_experiment("vilt_mini_easy_pairs", overrides))
    rep = results["callbacks"]["ArchitectureSkipping"]
    assert rep["arms"] == ["vilt.encoder.layer.0", "vilt.encoder.layer.1"]
    assert rep["phase"] == "skipping" and len(rep["chosen"]) == 1
    assert rep["macs_per_example"]["skipped"] < rep["macs_per_example"]["full"]
    assert results["test"]["questions"] == 60
    folder = tmp_path / "export"
    assert main(["export", str(out), "--out", str(folder), "--no-latency"]) == 0
    assert "CPU latency" not in capsys.readouterr().out
    exported = ExportedModel.load(folder)
    state = exported.model.state_dict()
    skipped = rep["chosen"][0]
    assert not any(k.startswith(f"{skipped}.attention.") for k in state)
    assert any(k.startswith(f"{skipped}.adapters.0.") for k in state)
    record = json.loads((folder / "export.json").read_text())
    assert record["reload_max_abs_diff"] < 1e-5 and "latency" not in record
    assert exported.model.reads_pairs
