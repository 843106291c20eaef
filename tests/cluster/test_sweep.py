"""Sweeps: points from grid x points x seeds, validation of every point before anything runs,
a local sweep end to end (a failing point, re-submission, resume), the Slurm parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import submitit
from cluster_helpers import broken_easy_vqa
from quick_run import TINY_RUN
from submitit.slurm.slurm import _make_sbatch_string

from vlcompress import cli
from vlcompress.cluster import sweep as sw
from vlcompress.config import ConfigError, load_experiment
from vlcompress.config.schema import SlurmConfig

TINY = [*TINY_RUN, "sweep.slurm.executor=local"]


def _cfg(*overrides):
    return load_experiment("default", list(overrides))[0]


def test_points_flat_and_nested_grid_times_points_times_seeds():
    flat = sw.expand_points(_cfg("sweep.grid={optim.lr: [0.001, 0.0003]}", "sweep.seeds=[0, 1]"))
    nested = sw.expand_points(
        _cfg("sweep.grid={optim: {lr: [0.001, 0.0003]}}", "sweep.seeds=[0, 1]")
    )
    assert (
        [p.name for p in flat]
        == [p.name for p in nested]
        == [
            "optim.lr=0.001,seed=0",
            "optim.lr=0.001,seed=1",
            "optim.lr=0.0003,seed=0",
            "optim.lr=0.0003,seed=1",
        ]
    )
    assert flat[2].overrides == ["optim.lr=0.0003", "seed=0"]
    assert flat[2].values == {"optim.lr": 0.0003, "seed": 0}
    # explicit points x grid x seeds; keys sorted (seed last) so names survive a reordered YAML
    pts = sw.expand_points(
        _cfg(
            "sweep.grid={optim.lr: [0.001, 0.01]}",
            "sweep.points=[{optim.name: adam}, {optim: {name: sgd, momentum: 0.5}}]",
            "sweep.seeds=[3]",
        )
    )
    assert len(pts) == 2 * 2 * 1
    assert pts[-1].name == "optim.lr=0.01,optim.momentum=0.5,optim.name=sgd,seed=3"
    assert sw.point_name({"data.options.data_dir": "/a b/c"}) == "data.options.data_dir=_a_b_c"
    long = sw.point_name({"k": "x" * 300})
    assert len(long) <= 120 and long != sw.point_name({"k": "x" * 299})


def test_a_point_can_carry_its_own_seeds():
    # 3 seeds at the 50% point, 1 elsewhere (the seed-000 sparsity sweeps); names match the
    # same point swept with sweep.seeds, so finished runs are found again
    pts = sw.expand_points(
        _cfg(
            "sweep.grid={optim.name: [adam, sgd]}",
            "sweep.points=[{optim.lr: 0.1}, {optim.lr: 0.5, seeds: [0, 1, 2]}]",
            "sweep.seeds=[0]",
        )
    )
    names = [p.name for p in pts]
    assert names == [
        "optim.lr=0.1,optim.name=adam,seed=0",
        "optim.lr=0.1,optim.name=sgd,seed=0",
        "optim.lr=0.5,optim.name=adam,seed=0",
        "optim.lr=0.5,optim.name=adam,seed=1",
        "optim.lr=0.5,optim.name=adam,seed=2",
        "optim.lr=0.5,optim.name=sgd,seed=0",
        "optim.lr=0.5,optim.name=sgd,seed=1",
        "optim.lr=0.5,optim.name=sgd,seed=2",
    ]
    assert all("seeds" not in p.values for p in pts)
    for bad, needle in (
        ("sweep.points=[{optim.lr: 0.5, seeds: []}]", "non-empty list"),
        ("sweep.points=[{optim.lr: 0.5, seeds: [1, 1]}]", "repeated"),
    ):
        with pytest.raises(ConfigError, match=needle):
            sw.expand_points(_cfg(bad, "sweep.seeds=[0]"))
    with pytest.raises(ConfigError, match="give sweep.seeds"):
        sw.expand_points(_cfg("sweep.points=[{optim.lr: 0.5, seeds: [1]}, {optim.lr: 0.1}]"))


def test_interpolations_in_swept_values_follow_each_point(tmp_path):
    # a stage-2 sweep starts each seed from the stage-1 run of the same seed
    overrides = [
        "sweep.points=[{init_from: 'runs/dense/loss=${loss.name},seed=${seed}', "
        "optim.lr: 0.1, seeds: [0, 1, 2]}]",
        "sweep.seeds=[0]",
        "loss.name=lmh",
    ]
    cfg, raw = load_experiment("default", overrides)
    pts = sw.expand_points(cfg, raw)
    assert [p.values["init_from"] for p in pts] == [
        f"runs/dense/loss=lmh,seed={s}" for s in (0, 1, 2)
    ]
    assert pts[1].overrides[0] == "init_from=runs/dense/loss=lmh,seed=1"
    # ... and the report averages them as one group
    assert {p.group["init_from"] for p in pts} == {"runs/dense/loss=${loss.name},seed=${seed}"}
    assert pts[1].name == "init_from=runs_dense_loss=lmh,seed=1,optim.lr=0.1,seed=1"
    # without the tree, the experiment's own seed fills them in (the old behaviour)
    assert {p.values["init_from"] for p in sw.expand_points(cfg)} == {"runs/dense/loss=lmh,seed=0"}
    bad = ["sweep.points=[{init_from: 'runs/${nowhere.key}'}]", "sweep.seeds=[0]"]
    with pytest.raises(ConfigError, match="cannot resolve"):
        sw.expand_points(*load_experiment("default", bad))


def test_sweep_section_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        sw.expand_points(
            _cfg(
                "sweep.grid={optim.lr: 0.1, trainer.max_epochs: [], output_dir: [a, b], seed: [1]}",
                "sweep.seeds=[0, 0]",
            )
        )
    text = str(e.value)
    for needle in (
        "must be a list",
        "empty list",
        "'output_dir' cannot be swept",
        "use one",
        "repeated",
    ):
        assert needle in text, needle
    with pytest.raises(ConfigError, match="no sweep"):
        sw.expand_points(_cfg())


def test_every_point_is_validated_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError) as e:
        sw.submit_sweep(
            "default_sweep",
            [
                *TINY,
                f"output_dir={tmp_path}",
                "sweep.grid={optim.lr: [0.001, -1.0], optim.name: [adamw, adamx]}",
            ],
        )
    text = str(e.value)
    assert "8 points" in text and "optim.lr" in text and "adamx" in text
    assert "and 1 more" in text  # one problem shared by 4 points is listed once
    assert not list(tmp_path.iterdir())  # nothing written, nothing run


def test_slurm_parameters_reach_the_executor(tmp_path, monkeypatch):
    slurm = SlurmConfig(
        executor="slurm", partition="gpu", time="1-02:00:30", nodes=2, tasks_per_node=4,
        gpus_per_node=4, cpus_per_task=8, mem_gb=64, array_parallelism=3,
        additional={"account": "proj", "qos": "high"},
    )  # fmt: skip
    params = sw.slurm_parameters(slurm, "exp")
    assert params == {
        "name": "exp",
        "timeout_min": 26 * 60 + 1,
        "nodes": 2,
        "tasks_per_node": 4,
        "cpus_per_task": 8,
        "gpus_per_node": 4,
        "mem_gb": 64,
        "slurm_partition": "gpu",
        "slurm_array_parallelism": 3,
        "slurm_additional_parameters": {"account": "proj", "qos": "high"},
    }
    assert "gpus_per_node" not in sw.slurm_parameters(SlurmConfig())  # CPU clusters: no --gpus
    with pytest.raises(ConfigError, match="time"):
        sw.slurm_parameters(SlurmConfig(time="soon"))
    # submitit refuses to build a Slurm executor without srun: pretend there is one
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    ex = sw.make_executor(slurm, tmp_path / "slurm", "exp")
    assert isinstance(ex._executor, submitit.SlurmExecutor)
    p = ex._executor.parameters
    assert (p["partition"], p["time"], p["nodes"], p["ntasks_per_node"]) == ("gpu", 1561, 2, 4)
    assert (p["gpus_per_node"], p["cpus_per_task"], p["mem"], p["job_name"]) == (
        4,
        8,
        "64GB",
        "exp",
    )
    script = _make_sbatch_string(command="run", folder=tmp_path, map_count=5, **p)
    for line in ("--array=0-4%3", "--partition=gpu", "--account=proj", "--qos=high",
                 "--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=2", "--time=1561"):  # fmt: skip
        assert f"#SBATCH {line}" in script, line


def test_slurm_consistency_and_executor_choice(monkeypatch):
    monkeypatch.setattr(sw.shutil, "which", lambda name: None)
    assert sw.resolve_executor("auto") == "local"
    with pytest.raises(ConfigError, match="sbatch"):
        sw.resolve_executor("slurm")
    monkeypatch.setattr(sw.shutil, "which", lambda name: "/usr/bin/sbatch")
    assert sw.resolve_executor("auto") == "slurm"
    cfg = _cfg("sweep.slurm.nodes=2", "trainer.num_nodes=1", "trainer.devices=2")
    problems = sw._slurm_consistency(cfg)
    assert len(problems) == 2 and "trainer.num_nodes" in problems[0]


def _fail_one_point(monkeypatch, calls: list[str], bad: tuple[float, int] | None):
    """Record every run; the point (lr, seed) == ``bad`` gets a data folder without images,
    so it fails at run time (FileNotFoundError in the data module) after passing validation."""
    import vlcompress.run

    real = vlcompress.run.run_experiment

    def run(cfg, raw=None):
        calls.append(Path(cfg.output_dir).name)
        if bad and (cfg.optim.lr, cfg.seed) == bad:
            data = broken_easy_vqa(Path(cfg.output_dir).parent / "no-such-data")
            cfg.data.options["data_dir"] = str(data)
        return real(cfg, raw)

    monkeypatch.setattr(vlcompress.run, "run_experiment", run)


def _manifest(folder: Path) -> dict[str, dict]:
    return {p["name"]: p for p in json.loads((folder / "sweep.json").read_text())["points"]}


def test_local_sweep_failure_resubmission_resume_and_report(tmp_path, monkeypatch, capsys):
    from vlcompress.cluster.report import build_report, write_report

    out = tmp_path / "sweep"
    args = ["sweep", "default_sweep", *TINY, f"output_dir={out}"]
    names = [
        "optim.lr=0.001,seed=0",
        "optim.lr=0.001,seed=1",
        "optim.lr=0.0003,seed=0",
        "optim.lr=0.0003,seed=1",
    ]
    bad = names[3]

    # 1. Four points; one fails at run time, the other three finish; exit code 1.
    calls: list[str] = []
    _fail_one_point(monkeypatch, calls, (3e-4, 1))
    assert cli.main(args) == 1
    assert calls == names
    m = _manifest(out)
    assert [m[n]["outcome"] for n in names] == ["finished"] * 3 + ["failed"]
    assert "FileNotFoundError" in m[bad]["error"] and "no-such-data" in m[bad]["error"]
    assert all((out / n / "results.json").is_file() for n in names[:3])
    assert "1 failed" in capsys.readouterr().out

    # The report lists the failed point and aggregates what finished.
    report = build_report(out)
    assert [r["n"] for r in report.rows] == [2, 1] and report.rows[1]["missing"] == 1
    assert any(bad in p and "FileNotFoundError" in p for p in report.problems)

    # 2. Re-submitted, nothing fixed: the finished points are skipped, only the failed one runs.
    calls.clear()
    assert cli.main(args) == 1
    assert calls == [bad]
    m = _manifest(out)
    assert [m[n]["outcome"] for n in names] == ["skipped"] * 3 + ["failed"]
    assert m[bad]["attempts"] == 2 and m[names[0]]["attempts"] == 1
    assert list((out / "_attempts").iterdir())  # the failed attempt's leftovers, moved aside

    # 3. Fixed; one finished point lost its results (a crash after the last checkpoint):
    #    it resumes from its checkpoint, the failed point runs from scratch.
    calls.clear()
    monkeypatch.undo()
    _fail_one_point(monkeypatch, calls, None)
    (out / names[1] / "results.json").unlink()
    manifest = sw.submit_sweep("default_sweep", [*TINY, f"output_dir={out}"])
    assert sorted(calls) == sorted([names[1], bad])
    assert sw.summarize(manifest) == {
        "finished": 1, "skipped": 2, "resumed": 1, "failed": 0, "submitted": 0, "running": 0,
    }  # fmt: skip
    assert _manifest(out)[names[1]]["outcome"] == "resumed"

    # 4. Report: mean and sample std over seeds, checked against every point's results.json.
    assert cli.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    acc = {n: json.loads((out / n / "results.json").read_text())["test"]["accuracy"] for n in names}
    report = build_report(out)
    assert report.keys == ["optim.lr"] and report.seed_key == "seed" and not report.problems
    for row, pair in zip(report.rows, (names[:2], names[2:])):
        a, b = (acc[n] for n in pair)
        assert row["n"] == 2 and row["missing"] == 0
        assert row["mean"] == pytest.approx((a + b) / 2)
        assert row["std"] == pytest.approx(abs(a - b) / 2**0.5)  # sample std of two values
        assert f"{(a + b) / 2:.4f}" in printed
    written = write_report(report)
    csv_text = (out / "report.csv").read_text()
    assert csv_text.splitlines()[0] == "optim.lr,n,mean,std,min,max,per_seed,missing,answers_blind"
    assert "| optim.lr | n | mean | std |" in (out / "report.md").read_text()
    assert [p.name for p in written["png"]] == ["report_test.accuracy_vs_optim.lr.png"]
    assert written["png"][0].read_bytes()[:4] == b"\x89PNG"


def test_submitit_executor_records_job_ids_and_failures(tmp_path):
    """Any submitit executor may be passed in; its jobs' ids and outcomes reach the manifest.
    (submitit's LocalExecutor: a real subprocess per point; the points fail fast here: their
    data folder passes the sweep's checks but has no images.)"""
    broken = broken_easy_vqa(tmp_path / "broken")
    ex = submitit.LocalExecutor(folder=tmp_path / "logs")
    ex.update_parameters(timeout_min=5)
    manifest = sw.submit_sweep(
        "default_sweep",
        [*TINY, f"output_dir={tmp_path / 'sweep'}", "sweep.seeds=[0]",
         f"sweep.grid={{optim.lr: [0.001], data.options.data_dir: [{broken}]}}"],
        executor=ex,
    )  # fmt: skip
    assert manifest["executor"] == "submitit"
    assert [p["outcome"] for p in manifest["points"]] == ["failed"]
    (point,) = manifest["points"]
    assert point["job_id"] and point["error"].startswith("FileNotFoundError")
    assert str(broken) in point["error"]
    assert "log " in point["error"]
