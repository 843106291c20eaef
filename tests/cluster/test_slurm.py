"""On a real Slurm cluster (two emulated nodes on this host): a 2-node DDP training through
sbatch/srun equals the single-process run, a submitit sweep with a failing point and a
re-submission that runs only what is missing, and a pre-emption (SIGUSR1 -> Lightning saves
an hpc checkpoint and requeues the job) that resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from cluster_helpers import (
    DDP_2X1,
    PER_RANK_OF_2,
    PYTHON,
    REPO,
    assert_same_run,
    broken_easy_vqa,
    run,
    train,
    weights,
)
from quick_run import TINY_RUN

pytestmark = pytest.mark.cluster

SBATCH = REPO / "cluster" / "train.sbatch"


def _env() -> dict[str, str]:
    """The submitting environment: the project's interpreter for the job, no Slurm variables
    inherited from an enclosing job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env["VLC_PYTHON"] = PYTHON
    return env


def sacct(job: str) -> list[dict[str, str]]:
    """The job's allocations (``-X``, one row per run of a requeued job with ``-D``)."""
    p = run(["sacct", "-j", job, "-X", "-D", "-n", "-P", "-o", "JobID,State,ExitCode,NodeList"], 30)
    keys = ("id", "state", "exit", "nodes")
    return [dict(zip(keys, line.split("|"))) for line in p.stdout.splitlines() if line]


def job_state(job: str) -> str:
    p = run(["squeue", "-h", "-j", job, "-o", "%T"], 30)
    if p.stdout.strip():
        return p.stdout.strip()
    rows = sacct(job)
    return rows[-1]["state"] if rows else "UNKNOWN"


def wait_until(predicate, timeout: float, what: str, job: str | None = None) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            if job:
                run(["scancel", job], 30)
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(1)


def sbatch(*args: str, cwd: Path = REPO) -> str:
    p = run(["sbatch", "--parsable", *args], 30, cwd=cwd, env=_env())
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def wait_job(job: str, timeout: float, log: Path) -> str:
    """Wait for the job to leave the queue; on timeout cancel it and fail with its log."""
    end = time.time() + timeout
    while (state := job_state(job)) in (
        "PENDING",
        "RUNNING",
        "COMPLETING",
        "CONFIGURING",
        "REQUEUED",
    ):
        if time.time() > end:
            run(["scancel", job], 30)
            pytest.fail(f"job {job} still {state} after {timeout}s:\n{_tail(log)}")
        time.sleep(1)
    return state


def _tail(log: Path, n: int = 6000) -> str:
    return log.read_text()[-n:] if log.is_file() else f"(no {log})"


# --- 2 nodes x 1 process through sbatch / srun ---------------------------------------------


def test_two_node_ddp_through_sbatch_equals_one_process(slurm, reference_run, tmp_path):
    out, log = tmp_path / "ddp", tmp_path / "job.out"
    job = sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={log}",
        str(SBATCH),
        "default",
        *PER_RANK_OF_2,
        *DDP_2X1,
        f"output_dir={out}",
    )
    state = wait_job(job, 360, log)
    assert state == "COMPLETED", f"job {job} {state} (sacct: {sacct(job)}):\n{_tail(log)}"
    rows = sacct(job)
    assert rows[-1]["nodes"] == "n[1-2]", rows  # really on two nodes
    assert "2 nodes x 1 tasks" in log.read_text()
    # Exactly one run folder, written once (rank 1 made nothing of its own beside it).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "job.out"]
    assert_same_run(out, reference_run)


def test_srun_gives_devices_nodes_and_one_run_folder(slurm, tmp_path):
    """``trainer.devices`` / ``num_nodes`` left at ``auto`` follow the allocation, and without
    ``output_dir=`` the ranks share one run folder, ``runs/<experiment>/slurm-<job id>``."""
    log = tmp_path / "job.out"
    script = tmp_path / "job.sh"
    script.write_text(f'#!/bin/bash\nsrun {PYTHON} -m vlcompress train default "$@"\n')
    job = sbatch(
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--output={log}",
        str(script),
        *PER_RANK_OF_2,
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.max_epochs=1",
        "trainer.strategy=ddp",
        cwd=tmp_path,
    )
    state = wait_job(job, 300, log)
    assert state == "COMPLETED", f"job {job} {state}:\n{_tail(log)}"
    text = log.read_text()
    assert "MEMBER: 2/2" in text and "MEMBER: 1/2" in text, text[-4000:]
    assert [p.name for p in (tmp_path / "runs" / "default").iterdir()] == [f"slurm-{job}"]
    res = json.loads((tmp_path / "runs" / "default" / f"slurm-{job}" / "results.json").read_text())
    assert res["global_steps"] == 2 and res["test"]["questions"] == 2 * 128


# --- a submitit sweep: a point fails, the re-submission runs only that point ----------------


SWEEP = [
    *TINY_RUN,
    "threads=1",
    "sweep.slurm.executor=slurm",
    "sweep.slurm.cpus_per_task=1",
    "sweep.slurm.time=00:10:00",
    "sweep.seeds=[]",
    "sweep.grid={optim.lr: [0.001]}",
]


def test_submitit_sweep_failure_and_resubmission(slurm, tmp_path):
    from vlcompress.datamodules.easy_vqa import default_data_dir

    sweep_dir = tmp_path / "sweep"
    data = broken_easy_vqa(tmp_path / "data")  # no images yet: passes the checks, fails to read
    points = f"sweep.points=[{{seed: 0}}, {{seed: 1}}, {{seed: 2}}, {{seed: 3, data.options.data_dir: {data}}}]"
    args = [
        PYTHON,
        "-m",
        "vlcompress",
        "sweep",
        "default_sweep",
        *SWEEP,
        points,
        f"output_dir={sweep_dir}",
    ]

    def manifest() -> dict[str, dict]:
        return {p["name"]: p for p in json.loads((sweep_dir / "sweep.json").read_text())["points"]}

    def cancel_all() -> None:
        # only jobs the sweep did not see end (a timed-out test): a job whose outcome is known
        # may still be in its epilog, and cancelling it there turns COMPLETED into CANCELLED
        if (sweep_dir / "sweep.json").is_file():
            ended = ("finished", "failed", "skipped")
            ids = [
                p["job_id"]
                for p in manifest().values()
                if p.get("job_id") and p.get("outcome") not in ended
            ]
            if ids:
                run(["scancel", *ids], 30)

    def final_states(jobs: dict[str, str]) -> dict[str, str]:
        # sacct may still report a job that has just ended as RUNNING / COMPLETING
        import submitit

        deadline = time.time() + 60
        while True:
            states = {
                n: submitit.SlurmJob(folder=sweep_dir / "slurm", job_id=j).state
                for n, j in jobs.items()
            }
            busy = {"RUNNING", "COMPLETING", "PENDING", "UNKNOWN"}
            if not busy & set(states.values()) or time.time() > deadline:
                return states
            time.sleep(2)

    # 1. Four points as a job array; the point with the data folder without images fails.
    try:
        p = run(args, 420, cwd=REPO, env=_env())
    finally:
        cancel_all()
    m = manifest()
    assert len(m) == 4, m.keys()
    bad = next(n for n in m if "data_dir" in n)
    good = [n for n in m if n != bad]
    assert p.returncode == 1, f"{p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert {n: m[n]["outcome"] for n in m} == {**dict.fromkeys(good, "finished"), bad: "failed"}, (
        p.stderr[-3000:]
    )
    assert "FileNotFoundError" in m[bad]["error"] and str(data) in m[bad]["error"]
    assert all(m[n]["executor"] == "slurm" and m[n]["job_id"] for n in m)
    first_jobs = {n: m[n]["job_id"] for n in m}
    assert len(set(first_jobs.values())) == 4

    # Slurm's accounting knows the outcome of every job (submitit reads states from sacct:
    # without it they read UNKNOWN and a re-submission cannot tell a finished job).
    states = final_states(first_jobs)
    assert {n: states[n] for n in good} == dict.fromkeys(good, "COMPLETED"), states
    assert states[bad] == "FAILED", states
    done = {n: (sweep_dir / n / "results.json").stat().st_mtime_ns for n in good}

    # 2. Fixed (the real data folder takes its place) and re-submitted: only the failed point
    #    runs again.
    shutil.rmtree(data)
    data.symlink_to(default_data_dir(), target_is_directory=True)
    try:
        p = run(args, 300, cwd=REPO, env=_env())
    finally:
        cancel_all()
    assert p.returncode == 0, f"{p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    m = manifest()
    assert {n: m[n]["outcome"] for n in m} == {**dict.fromkeys(good, "skipped"), bad: "finished"}
    assert {n: m[n]["job_id"] for n in good} == {n: first_jobs[n] for n in good}
    assert m[bad]["job_id"] != first_jobs[bad] and m[bad]["attempts"] == 2
    assert final_states({bad: m[bad]["job_id"]})[bad] == "COMPLETED"
    assert {n: (sweep_dir / n / "results.json").stat().st_mtime_ns for n in good} == done
    res = json.loads((sweep_dir / bad / "results.json").read_text())
    assert 0.0 <= res["test"]["accuracy"] <= 1.0


# --- pre-emption: SIGUSR1 -> hpc checkpoint + requeue -> the requeued job resumes exactly ---

PREEMPT = [
    "model.name=mcan_tiny",
    "model.options={visual_input: grid, grid_channels: [8, 8, 16, 16], grid_cells: 16}",
    "progress_bar=false",
    "data.options.batch_size=32",
    "data.options.eval_batch_size=256",
    "trainer.limit_train_batches=40",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=5",
    "trainer.max_epochs=3",
    "trainer.accelerator=cpu",
    "scheduler.name=none",
    "threads=1",
]


def test_preempted_job_is_requeued_and_resumes_exactly(slurm, tmp_path):
    straight, cut, log = tmp_path / "straight", tmp_path / "cut", tmp_path / "job.out"
    job = sbatch(
        "--nodes=1",
        "--ntasks-per-node=1",
        f"--output={log}",
        str(SBATCH),
        "default",
        *PREEMPT,
        "trainer.num_nodes=1",
        f"output_dir={cut}",
    )
    try:
        # Pre-empt in the middle of training: once epoch 0 has been checkpointed.
        wait_until(
            lambda: (
                (cut / "checkpoints" / "last.ckpt").is_file()
                or job_state(job) not in ("PENDING", "RUNNING")
            ),
            240,
            "epoch 0 of the job to finish",
            job,
        )
        assert job_state(job) == "RUNNING", f"the job ended before the pre-emption:\n{_tail(log)}"
        # What Slurm sends ahead of a pre-emption or the time limit (#SBATCH --signal=USR1@90).
        run(["scancel", "--signal=USR1", job], 30)
        wait_until(
            lambda: "restart 1" in (log.read_text() if log.is_file() else ""),
            120,
            f"the job to be requeued and to start again\n{_tail(log)}",
            job,
        )
        state = wait_job(job, 300, log)
    finally:
        run(["scancel", job], 30)
    text = log.read_text()
    assert state == "COMPLETED", f"job {job} {state} (sacct: {sacct(job)}):\n{text[-6000:]}"
    assert "restart 1" in text and "restart 2" not in text, text[-6000:]
    assert len(sacct(job)) == 2, sacct(job)  # the pre-empted allocation and the requeued one
    assert list(cut.glob("hpc_ckpt_*.ckpt")), "Lightning's hpc checkpoint is missing"

    assert "Restoring states from the checkpoint" in (cut / "run.log").read_text()

    # The uninterrupted run: same weights, bit for bit; the history has all three epochs.
    # Same strategy as the job (train.sbatch asks for DDP): Lightning's DDP launcher, even for
    # one process, sets torch's thread count, and another thread count rounds differently.
    train(straight, *PREEMPT, "trainer.strategy=ddp", "trainer.num_nodes=1", "trainer.devices=1")
    a, b = weights(straight), weights(cut)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (straight, cut))
    assert rb["global_steps"] == ra["global_steps"] == 120
    assert rb["test"]["accuracy"] == ra["test"]["accuracy"]
    import csv

    rows = list(csv.DictReader((cut / "metrics.csv").open()))
    assert sorted({r["epoch"] for r in rows if r.get("val/acc")}) == ["0", "1", "2"]
