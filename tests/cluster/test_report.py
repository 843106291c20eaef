"""Sweep reports: grouping by the swept keys, mean ± sample std over seeds, failed and missing
points listed, CSV / Markdown / PNG, and a sweep folder without a manifest."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import yaml

from vlcompress import cli
from vlcompress.cluster.report import build_report, lookup, write_report
from vlcompress.utils.io import atomic_write_json

ACC = {  # (lr, opt, seed) -> test accuracy
    (0.001, "adam", 0): 0.50,
    (0.001, "adam", 1): 0.60,
    (0.001, "adam", 2): 0.70,
    (0.0003, "adam", 0): 0.40,
    (0.0003, "adam", 1): 0.45,
    (0.001, "sgd", 0): 0.30,
    (0.001, "sgd", 1): 0.20,
    (0.0003, "sgd", 0): 0.10,
}


def _fake_sweep(folder, manifest=True):
    """A sweep folder as submit_sweep leaves it: 2 lr x 2 optimisers x 3 seeds, 8 finished
    points, one failed, three never run."""
    points = []
    for lr in (0.001, 0.0003):
        for opt in ("adam", "sgd"):
            for seed in (0, 1, 2):
                values = {"optim.lr": lr, "optim.name": opt, "seed": seed}
                name = f"optim.lr={lr},optim.name={opt},seed={seed}"
                failed = (lr, opt, seed) == (0.0003, "sgd", 1)
                points.append(
                    {"name": name, "dir": name, "values": values,
                     "state": "failed" if failed else "pending",
                     "error": "FileNotFoundError: no data\nTraceback ..." if failed else None}
                )  # fmt: skip
                d = folder / name
                d.mkdir(parents=True)
                cfg = {"seed": seed, "output_dir": str(d), "optim": {"lr": lr, "name": opt},
                       "trainer": {"max_epochs": 1}}  # fmt: skip
                (d / "config.yaml").write_text(yaml.safe_dump(cfg))
                if (lr, opt, seed) in ACC:
                    res = {"test": {"accuracy": ACC[lr, opt, seed]}, "best_val_accuracy": 0.9}
                    if opt == "sgd":  # the sgd runs answer from the question alone
                        res["blind"] = {"answers_without_image": True}
                    atomic_write_json(d / "results.json", res)
    if manifest:
        atomic_write_json(
            folder / "sweep.json",
            {"points": points, "keys": ["optim.lr", "optim.name"], "seed_key": "seed",
             "metric": "test.accuracy"},
        )  # fmt: skip


def _rows(report):
    return {(r["values"]["optim.lr"], r["values"]["optim.name"]): r for r in report.rows}


@pytest.mark.parametrize("manifest", [True, False], ids=["sweep.json", "config.yaml"])
def test_mean_std_over_seeds_and_missing_points(tmp_path, manifest):
    _fake_sweep(tmp_path, manifest)
    report = build_report(tmp_path)
    assert report.metric == "test.accuracy" and report.seed_key == "seed"
    assert sorted(report.keys) == ["optim.lr", "optim.name"]
    rows = _rows(report)
    assert len(rows) == 4
    for (lr, opt), row in rows.items():
        vals = [ACC[k] for k in sorted(ACC) if k[:2] == (lr, opt)]
        assert row["n"] == len(vals) and row["missing"] == 3 - len(vals)
        assert row["mean"] == pytest.approx(statistics.fmean(vals))
        if len(vals) > 1:
            assert row["std"] == pytest.approx(statistics.stdev(vals))
        else:
            assert row["std"] is None  # one seed: no spread to report
    assert rows[0.001, "adam"]["std"] == pytest.approx(0.1)  # 0.5, 0.6, 0.7
    # every point without a result is listed (the failure's first line, the others as missing)
    assert len(report.problems) == 4
    failed = [p for p in report.problems if "failed" in p]
    if manifest:
        assert failed == [
            "optim.lr=0.0003,optim.name=sgd,seed=1: failed: FileNotFoundError: no data"
        ]


def test_files_table_and_plots(tmp_path, capsys):
    _fake_sweep(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.6000" in out and "0.1000" in out  # lr=0.001, adam: mean 0.6, std 0.1
    assert "failed: FileNotFoundError" in out
    with (tmp_path / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows[0].keys() == {"optim.lr", "optim.name", "n", "mean", "std", "min", "max",
                              "per_seed", "missing", "answers_blind"}  # fmt: skip
    adam = next(r for r in rows if r["optim.lr"] == "0.001" and r["optim.name"] == "adam")
    assert float(adam["mean"]) == pytest.approx(0.6) and float(adam["std"]) == pytest.approx(0.1)
    assert json.loads(adam["per_seed"]) == {"0": 0.5, "1": 0.6, "2": 0.7}
    md = (tmp_path / "report.md").read_text()
    assert "| optim.lr | optim.name | n | mean | std |" in md
    assert "## Points without a result (4)" in md
    # runs that answer without the image are flagged, per group, with the legend
    assert "| 0.001 | sgd | 2 | 0.2500 |" in md and "| BLIND 2/3 |" in md
    assert md.count("BLIND ") == 3 and "BLIND k/n: k of the group's n runs answer" in md
    assert {r["optim.name"]: r["answers_blind"] for r in rows if r["optim.lr"] == "0.001"} == {
        "adam": "0", "sgd": "2"
    }  # fmt: skip
    for key in ("optim.lr", "optim.name"):
        png = tmp_path / f"report_test.accuracy_vs_{key}.png"
        assert png.read_bytes()[:4] == b"\x89PNG", key


def test_other_metric_one_plot_and_errors(tmp_path, capsys):
    _fake_sweep(tmp_path)
    report = build_report(tmp_path, "best_val_accuracy")
    assert all(r["mean"] == pytest.approx(0.9) for r in report.rows)
    written = write_report(report, x="optim.lr")
    assert [p.name for p in written["png"]] == ["report_best_val_accuracy_vs_optim.lr.png"]
    with pytest.raises(ValueError, match="swept keys are: optim.lr, optim.name"):
        write_report(report, x="optim.betas")
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no sweep folder" in capsys.readouterr().err
    assert lookup({"a": {"b": 1}}, "a.c") is None


def test_a_baseline_sweep_is_drawn_and_listed(tmp_path, capsys):
    sweep, dense = tmp_path / "pruned", tmp_path / "dense"
    _fake_sweep(sweep)
    _fake_sweep(dense)
    args = ["report", str(sweep), "--baseline", str(dense), "--x", "optim.lr"]
    assert cli.main(args) == 0
    md = (sweep / "report.md").read_text()
    head, base = md.split("## Baselines: test.accuracy")
    assert f"`{dense}`" in base and "| 0.001 | adam | 3 | 0.6000 |" in base
    png = sweep / "report_test.accuracy_vs_optim.lr.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert cli.main([*args[:3], str(tmp_path / "nowhere")]) == 2
    assert "no sweep folder" in capsys.readouterr().err


def test_points_of_one_interpolated_group_average_over_seeds(tmp_path):
    # init_from: runs/dense/seed=${seed} differs per seed but is one group (sweep.json "group")
    points = []
    for seed, acc in ((0, 0.5), (1, 0.7)):
        name = f"init_from=runs_dense_seed={seed},seed={seed}"
        values = {"init_from": f"runs/dense/seed={seed}", "seed": seed}
        group = {"init_from": "runs/dense/seed=${seed}", "seed": seed}
        points.append({"name": name, "dir": name, "values": values, "group": group})
        atomic_write_json(tmp_path / name / "results.json", {"test": {"accuracy": acc}})
    manifest = {"points": points, "keys": ["init_from"], "seed_key": "seed"}
    atomic_write_json(tmp_path / "sweep.json", manifest)
    (row,) = build_report(tmp_path).rows
    assert row["n"] == 2 and row["mean"] == pytest.approx(0.6)
    assert row["values"] == {"init_from": "runs/dense/seed=${seed}"}
