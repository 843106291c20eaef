"""``python -m vlcompress export`` on a real (tiny) slimmable easy-VQA run: selection by
validation accuracy only, arguments checked before anything is built, runs without slimmable
training refused, latency spread, reuse of ``submodels.json``, and an export that answers real
questions on its own."""

import ast
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vlcompress.cli import main
from vlcompress.config import load_experiment
from vlcompress.run import run_experiment

MODEL = (
    "model.options={visual_input: grid, grid_channels: [8, 8, 16, 16], grid_cells: 16, "
    "width_adapters: true, num_layers: 3}"
)
SPACE = "[[0.25, '1/3'], [0.5, '2/3'], [0.75, 1], [1, 1]]"
SLIM = (
    "callbacks=[{name: slimmable_training, options: {space: " + SPACE + ", distill: inplace, "
    "sample: 1}}]"
)


@pytest.fixture(scope="module")
def bst_run(tmp_path_factory):
    """A finished slimmable run (4 submodels, one short epoch); tests copy it before editing."""
    from quick_run import TINY_RUN

    out = tmp_path_factory.mktemp("bst") / "run"
    overrides = [*TINY_RUN, MODEL, SLIM, f"output_dir={out}", "trainer.max_epochs=1",
                 "data.options.eval_batch_size=64", "trainer.limit_val_batches=1"]  # fmt: skip
    run_experiment(*load_experiment("default", overrides))
    return out


def copy_run(src, dst, val=None, test=None, keep_val=True):
    """A copy of the run ``src`` with the per-submodel val / test accuracies replaced
    (``{submodel: accuracy}``) or the validation tables removed (``keep_val=False``)."""
    shutil.copytree(src, dst)
    results = json.loads((dst / "results.json").read_text())
    report = results["callbacks"]["SlimmableTraining"]
    ckpt_path = dst / "checkpoints" / "best.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=False)
    tables = ckpt["callbacks"]["SlimmableTraining"]["state"]["tables"]
    for rows, accs in ((report["val_submodels"], val), (tables["val"], val),
                       (report["test_submodels"], test)):  # fmt: skip
        for r in rows:
            r["accuracy"] = (accs or {}).get(r["submodel"], r["accuracy"])
    if not keep_val:
        report.pop("val_submodels")
        tables.pop("val")
    (dst / "results.json").write_text(json.dumps(results))
    torch.save(ckpt, ckpt_path)
    return dst


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if the export builds the data module or profiles a submodel."""
    import vlcompress.export
    import vlcompress.run

    def boom(*a, **k):
        raise AssertionError("built or profiled before the arguments were checked")

    monkeypatch.setattr(vlcompress.run, "build_datamodule", boom)
    monkeypatch.setattr(vlcompress.export, "profile_submodels", boom)


def test_bad_budgets_are_refused_before_anything_is_built(bst_run, nothing_built, capsys):
    run = str(bst_run)
    assert main(["export", run, "budget=mac=1e7"]) == 1
    line = one_error_line(capsys)
    assert "unknown key 'mac'" in line and "did you mean 'macs'" in line
    assert "parameters, macs, flops, latency_b1_ms, latency_large_ms" in line
    assert main(["export", run, "budget=macs=lots"]) == 1
    assert "'lots' is not a positive number" in one_error_line(capsys)
    assert main(["export", run, "budget=macs=1e7", "width=1/2", "depth=1"]) == 1
    assert "not both" in one_error_line(capsys)
    # nothing fits: the smallest achievable MACs is named (the callback's counted costs)
    val = json.loads((bst_run / "results.json").read_text())
    smallest = min(r["macs"] for r in val["callbacks"]["SlimmableTraining"]["val_submodels"])
    assert main(["export", run, "budget=macs=1000"]) == 1
    line = one_error_line(capsys)
    assert f"smallest achievable: macs={smallest:.4g} (w1/4-d1/3)" in line


def test_runs_without_slimmable_training_or_outside_the_space_are_refused(
    bst_run, tmp_path, nothing_built, capsys
):
    plain = tmp_path / "plain"
    shutil.copytree(bst_run, plain)
    cfg = yaml.safe_load((plain / "config.yaml").read_text())
    cfg["callbacks"] = []  # as the default experiment (make train): no slimmable training
    (plain / "config.yaml").write_text(yaml.safe_dump(cfg))
    for settings in (["width=1/4", "depth=1/6"], ["budget=macs=1e7"], ["--table"]):
        assert main(["export", str(plain), *settings]) == 1
        line = one_error_line(capsys)
        assert (
            "had no slimmable training" in line and "callbacks=[{name: slimmable_training}]" in line
        )
    # the run's space is [w1/4-d1/3, w1/2-d2/3, w3/4-d1, w1-d1]: w1-d1/3 was never trained
    assert main(["export", str(bst_run), "width=1", "depth=1/3"]) == 1
    line = one_error_line(capsys)
    assert "w1-d1/3 is not in the run's submodel space" in line
    assert "w1/4-d1/3, w1/2-d2/3, w3/4-d1, w1-d1" in line
    assert not (bst_run / "export").exists()


def test_budget_selects_by_validation_accuracy_only(bst_run, tmp_path, capsys):
    # validation prefers w1/4-d1/3, test (not to be used) prefers w1/2-d2/3
    run = copy_run(bst_run, tmp_path / "run", val={"w1/4-d1/3": 0.7, "w1/2-d2/3": 0.6},
                   test={"w1/4-d1/3": 0.5, "w1/2-d2/3": 0.9})  # fmt: skip
    macs = {r["submodel"]: r["macs"] for r in
            json.loads((run / "results.json").read_text())["callbacks"]["SlimmableTraining"]
            ["val_submodels"]}  # fmt: skip
    limit = macs["w1/2-d2/3"]  # both fit
    assert main(["export", str(run), f"budget=macs={limit}", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "w1/4-d1/3 has the best validation accuracy (0.7000)" in out
    assert "test accuracy 0.5000, not used to select" in out
    rec = json.loads((tmp_path / "e" / "export.json").read_text())
    assert rec["submodel"] == "w1/4-d1/3" and rec["val_accuracy"] == 0.7
    assert rec["test_accuracy"] == 0.5 and rec["val_accuracy_from"] == "checkpoint"
    assert rec["costs_from"] == "slimmable_training's table" and rec["reload_max_abs_diff"] == 0


def test_budget_needs_validation_accuracies(bst_run, tmp_path, nothing_built, capsys):
    run = copy_run(bst_run, tmp_path / "old", keep_val=False)
    assert main(["export", str(run), "budget=macs=1e9"]) == 1
    line = one_error_line(capsys)
    assert "validation accuracy" in line and "give width= and depth= instead" in line


def test_table_latency_spread_and_reuse(bst_run, tmp_path, monkeypatch, caplog, capsys):
    import vlcompress.export

    run = copy_run(bst_run, tmp_path / "run")
    args = ["--large-batch", "4", "--repeats", "5"]
    assert main(["export", str(run), "--table", *args]) == 0
    assert "val acc" in capsys.readouterr().out
    saved = json.loads((run / "submodels.json").read_text())
    ckpt = run / "checkpoints" / "best.ckpt"
    assert saved["source"]["checkpoint"] == str(ckpt.resolve())
    assert saved["source"]["size"] == ckpt.stat().st_size and saved["repeats"] == 5
    for r in saved["rows"]:
        for key in ("latency_b1", "latency_large"):
            assert 0 < r[f"{key}_p10_ms"] <= r[f"{key}_ms"] <= r[f"{key}_p90_ms"]
        assert r["val_accuracy"] is not None and "accuracy" not in r
    md = (run / "submodels.md").read_text()
    assert "| submodel | val acc | test acc |" in md and "median (p10-p90)" in md
    # a latency budget reuses the table of the same checkpoint, and warns on a wide spread
    rows = saved["rows"]
    rows[0].update(latency_b1_ms=2.0, latency_b1_p10_ms=1.0, latency_b1_p90_ms=9.0)
    (run / "submodels.json").write_text(json.dumps(saved))
    calls = []
    real = vlcompress.export.profile_submodels
    monkeypatch.setattr(vlcompress.export, "profile_submodels",
                        lambda *a, **k: calls.append(1) or real(*a, **k))  # fmt: skip
    with caplog.at_level("WARNING", logger="vlcompress"):
        assert (
            main(
                [
                    "export",
                    str(run),
                    "budget=latency_b1_ms=1e9",
                    *args,
                    "--out",
                    str(tmp_path / "a"),
                ]
            )
            == 0
        )
    assert calls == []
    assert "latency too noisy to trust" in caplog.text and "w1/4-d1/3 latency_b1_ms" in caplog.text
    rec = json.loads((tmp_path / "a" / "export.json").read_text())
    assert rec["costs_from"] == "submodels.json"
    # a retrained (here: touched) checkpoint is profiled again
    os.utime(ckpt, ns=(ckpt.stat().st_atime_ns, ckpt.stat().st_mtime_ns + 10**9))
    assert (
        main(["export", str(run), "budget=latency_b1_ms=1e9", *args, "--out", str(tmp_path / "b")])
        == 0
    )
    assert calls == [1]
    assert json.loads((tmp_path / "b" / "export.json").read_text())["costs_from"] == "profiled"


def test_export_answers_real_questions_on_its_own(bst_run, tmp_path, capsys):
    from PIL import Image

    from vlcompress.compress.slimmable import Slimmable, Submodel
    from vlcompress.compress.submodels import ExportedModel, load_export
    from vlcompress.run import build_datamodule, build_task

    folder = tmp_path / "e"
    assert main(["export", str(bst_run), "width=1/2", "depth=2/3", "--out", str(folder)]) == 0
    exported = ExportedModel.load(folder)
    assert isinstance(load_export(folder), torch.nn.Module)  # the bare model, as before
    assert exported.record["submodel"] == "w1/2-d2/3" and exported.visual_shape == (3, 64, 64)

    # the slimmed model on the data module's batch of the first real test questions
    cfg, _ = load_experiment(str(bst_run / "config.yaml"))
    dm = build_datamodule(cfg.data, cfg.seed)
    task = build_task(cfg, dm)
    state = torch.load(bst_run / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
    task.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    model = task.model.eval()
    n_train = len(json.loads((dm.root / "train" / "questions.json").read_text()))
    test = json.loads((dm.root / "test" / "questions.json").read_text())[:12]
    batch = dm.batch_rows(np.arange(n_train, n_train + len(test)))
    with torch.no_grad(), Slimmable(model).submodel(Submodel(0.5, 2 / 3)):
        logits = model(batch)
    expected = [dm.answer_vocab.answers[i] for i in logits.argmax(-1).tolist()]

    questions = [q for q, _, _ in test]
    images = [Image.open(dm.root / "test" / "images" / f"{img}.png") for _, _, img in test]
    assert exported.predict(questions, images) == expected
    mine = exported.batch(questions, images)  # encoded exactly as in training
    assert torch.equal(mine.text_ids, batch.text_ids) and torch.equal(mine.visual, batch.visual)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(mine), logits, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="resize them first"):
        exported.predict(questions[:1], [np.zeros((32, 32, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="one image per question"):
        exported.predict(questions[:2], images[:1])
    # the README's example, on this export
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- readme-example: export-predict -->\s*```python\n(.*?)```", text, re.S)
    code = code.group(1).replace("runs/seed001_bst/export/w0.25_d1", str(folder))
    assert str(folder) in code
    capsys.readouterr()
    exec(compile(code, "README.md", "exec"), {})
    printed = ast.literal_eval(capsys.readouterr().out.strip())
    assert len(printed) == 4 and set(printed) <= set(exported.answers)
    # an export written before exports carried their inputs: a clear way out
    (folder / "inputs.json").unlink()
    with pytest.raises(FileNotFoundError, match="export it again"):
        ExportedModel.load(folder)


def test_separate_runs_are_matched_to_the_submodel_of_their_shape(bst_run, tmp_path, capsys):
    from quick_run import TINY_RUN

    from vlcompress import registry

    cfg = yaml.safe_load((bst_run / "config.yaml").read_text())["model"]
    model = registry.build("model", cfg["name"], cfg["options"], vocab_size=10, num_answers=5)
    shape = model.slimmed_options(0.5, 2)  # the run's submodel w1/2-d2/3, trained on its own
    own = tmp_path / "separate" / "w_half"
    opts = ", ".join(f"{k}: {v}" for k, v in shape.items())
    run_experiment(*load_experiment("default", [
        *TINY_RUN, MODEL, f"output_dir={own}", "trainer.max_epochs=1",
        *(f"model.options.{k}={v}" for k, v in shape.items()),
    ]))  # fmt: skip
    other = tmp_path / "separate" / "plain"  # no adapters: no submodel has its shape
    run_experiment(*load_experiment("default", [*TINY_RUN, f"output_dir={other}",
                                                "trainer.max_epochs=1"]))  # fmt: skip
    assert main(["export", str(bst_run), "--separate", str(tmp_path / "separate")]) == 0, opts
    out = capsys.readouterr().out
    sub = json.loads((bst_run / "results.json").read_text())["callbacks"]["SlimmableTraining"]
    test = {r["submodel"]: r["accuracy"] for r in sub["test_submodels"]}
    own_acc = json.loads((own / "results.json").read_text())["test"]["accuracy"]
    line = next(x for x in out.splitlines() if "w_half" in x)
    assert "w1/2-d2/3" in line and f"{own_acc:.4f}" in line and f"{test['w1/2-d2/3']:.4f}" in line
    assert "no submodel" in next(x for x in out.splitlines() if "plain" in x)
    assert (bst_run / "slimmable_vs_separate.png").read_bytes()[:4] == b"\x89PNG"
    # a setting after --separate is a setting, not a folder (width=2 is out of the space)
    assert main(["export", str(bst_run), "--separate", str(tmp_path / "separate"), "width=2",
                 "depth=1"]) == 1  # fmt: skip
    assert "width" in capsys.readouterr().err
    assert main(["export", str(bst_run), "--separate", str(tmp_path / "nothing")]) == 1
    assert "no finished run" in one_error_line(capsys)
