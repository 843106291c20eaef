"""Sweeps: one run per point of an experiment's ``sweep:`` section, through submitit.

A sweep expands ``sweep.grid`` (every combination), ``sweep.points`` (explicit points, crossed
with the grid) and ``sweep.seeds`` (every point once per seed) into points, validates the full
configuration of every point before anything runs (all problems at once), and runs each point
into its own run folder under one sweep folder::

    runs/<experiment>/sweep/
        sweep.json                     # the manifest: points, folders, job ids, states, errors
        optim.lr=0.001,seed=0/         # one ordinary run folder per point (results.json, ...)
        optim.lr=0.0003,seed=0/
        _attempts/                     # leftovers of failed attempts, moved aside before a retry
        slurm/                         # submitit's job files and logs (Slurm only)

Where the points run (``sweep.slurm.executor``):

* ``slurm`` (or ``auto`` with ``sbatch`` on the PATH): a Slurm job array through
  :class:`submitit.AutoExecutor`, with partition, time, nodes, tasks/GPUs/CPUs per node,
  memory, array parallelism and any other sbatch options from ``sweep.slurm``.
* ``local``: the points run one after another **in this process**. This is deliberate: submitit's
  ``LocalExecutor`` starts every submitted job at once as its own subprocess (no parallelism
  limit), re-imports torch and Lightning per point and leaves orphans behind when the parent is
  killed (a CI timeout), whereas an in-process loop is sequential, cheap, needs no pickling and
  leaves nothing running. Run folders are independent and every run re-seeds, so points do not
  influence one another. Any submitit executor may still be passed to :func:`submit_sweep`
  explicitly (e.g. a ``LocalExecutor`` for process isolation, or a pre-configured Slurm one).

A re-submitted sweep skips points whose folder holds ``results.json``, resumes points whose
folder holds ``checkpoints/last.ckpt`` but no results (``resume=true``), and re-runs the others
(a failed attempt's folder is moved aside to ``_attempts/`` first). A failing point is recorded
as failed in the manifest, with its error, and the other points go on.

This module plans, runs and submits; the points come from :mod:`.points`, the Slurm executor
from :mod:`.slurm` and the manifest from :mod:`.manifest` (their public names are re-exported
here).

Example:
    >>> from vlcompress.cluster.sweep import submit_sweep  # doctest: +SKIP
    >>> manifest = submit_sweep("default_sweep", ["trainer.max_epochs=1"])  # doctest: +SKIP
    >>> summarize(manifest)  # doctest: +SKIP
    {'finished': 4, 'skipped': 0, 'resumed': 0, 'failed': 0, 'submitted': 0, 'running': 0}
"""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil  # noqa: F401  (tests patch ``sweep.shutil.which``; the module object is shared)
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlcompress.cluster.manifest import (
    MANIFEST,
    OUTCOMES,
    Manifest,
    PointEntry,
    _now,
    load_manifest,
    summarize,
)
from vlcompress.cluster.points import (
    POINT_SEEDS,
    Point,
    expand_points,
    flatten_grid,
    format_override,
    point_name,
)
from vlcompress.cluster.slurm import (
    job_active,
    make_executor,
    resolve_executor,
    slurm_parameters,
    time_to_minutes,
)
from vlcompress.cluster.slurm import slurm_consistency as _slurm_consistency
from vlcompress.config import ConfigError, ExperimentConfig, load_experiment
from vlcompress.config.load import experiments_dir
from vlcompress.preflight import preflight

__all__ = [
    "MANIFEST",
    "OUTCOMES",
    "POINT_SEEDS",
    "Manifest",
    "Point",
    "PointEntry",
    "expand_points",
    "flatten_grid",
    "format_override",
    "load_manifest",
    "make_executor",
    "plan_sweep",
    "point_name",
    "resolve_executor",
    "run_point",
    "slurm_parameters",
    "submit_sweep",
    "summarize",
    "time_to_minutes",
]

log = logging.getLogger(__name__)


def _split_overrides(overrides: Sequence[str]) -> tuple[list[str], str | None]:
    """The overrides passed on to every point (without ``output_dir=``/``resume=``, which the
    sweep sets per point) and the ``output_dir=`` override's value, if any."""
    keep, out = [], None
    for o in overrides:
        key, _, value = o.partition("=")
        key = key.strip().lstrip("+")
        if key == "output_dir":
            out = value.strip() or None
        elif key != "resume":
            keep.append(o)
    return keep, out


def _default_sweep_dir(cfg: ExperimentConfig, override_dir: str | None) -> Path:
    if override_dir:
        return Path(override_dir)
    if cfg.sweep.output_dir:
        return Path(cfg.sweep.output_dir)
    return Path("runs") / cfg.name / "sweep"


def _error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 4000 else text[:4000] + " ..."


def _is_interruption(e: BaseException) -> bool:
    """``vlcompress.run.RunInterrupted`` (a signal; the run saved a checkpoint), by name so
    this module does not depend on it."""
    return any(c.__name__ == "RunInterrupted" for c in type(e).__mro__)


def _job_error_text(e: BaseException, job: Any) -> str:
    """A submitit job's error: the remote exception (not submitit's wrapper) and the log."""
    text = str(e)
    m = re.search(r"-{10,}\n(.*?)\n-{10,}", text, re.S)
    if m:
        lines = m.group(1).splitlines()
        starts = [i for i, ln in enumerate(lines) if re.match(r"[A-Za-z_][\w.]*(: |$)", ln)]
        if starts:
            text = "\n".join(lines[starts[-1] :])
    try:
        text += f"\n(job {job.job_id}; log {job.paths.stderr})"
    except Exception:  # a job without paths (a custom executor)
        pass
    return _error_text(RuntimeError(text)).removeprefix("RuntimeError: ")


def run_point(
    exp: str,
    overrides: Sequence[str],
    point_dir: str | Path,
    root: str | Path | None = None,
) -> dict[str, Any]:
    """Run one point into ``point_dir`` (the job function; runs where the job runs).

    The folder's state decides, at run time (so a requeued Slurm job resumes too): with
    ``results.json`` the point is done; with ``checkpoints/last.ckpt`` it resumes
    (``resume=true``); otherwise leftovers of a failed attempt are moved aside to
    ``<sweep>/_attempts/<name>@<time>`` (by rank 0 only, in a multi-task job) and it runs
    from scratch.

    Args:
        exp: experiment name or YAML path (as given to :func:`load_experiment`).
        overrides: the sweep's overrides plus the point's.
        point_dir: the point's run folder (absolute on a cluster).
        root: the experiments folder (default: :func:`experiments_dir` where the job runs).

    Returns:
        ``{"outcome": "finished" | "resumed" | "skipped", "output_dir": ..., "wall_time_s": ...}``.

    Raises:
        ConfigError: the point's configuration is invalid.
        Exception: whatever the run raises (the caller records it as the point's error).

    Example:
        >>> run_point("default", ["trainer.max_epochs=1"], "/tmp/sweep/p0")  # doctest: +SKIP
        {'outcome': 'finished', 'output_dir': '/tmp/sweep/p0', 'wall_time_s': 51.2}
    """
    from vlcompress.run import run_experiment

    point_dir = Path(point_dir).absolute()
    if (point_dir / "results.json").is_file():
        return {"outcome": "skipped", "output_dir": str(point_dir), "wall_time_s": 0.0}
    resume = (point_dir / "checkpoints" / "last.ckpt").is_file()
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) or 0)
    if not resume and rank == 0 and point_dir.is_dir() and any(point_dir.iterdir()):
        aside = (
            point_dir.parent / "_attempts" / f"{point_dir.name}@{time.strftime('%Y%m%d-%H%M%S')}"
        )
        aside.parent.mkdir(parents=True, exist_ok=True)
        point_dir.rename(aside)
        log.info("moved the leftovers of an earlier attempt to %s", aside)
    t0 = time.time()
    cfg, raw = load_experiment(
        exp,
        [*overrides, f"output_dir={point_dir}", f"resume={'true' if resume else 'false'}"],
        Path(root) if root else None,
    )
    try:
        run_experiment(cfg, raw)
    finally:
        gc.collect()
    return {
        "outcome": "resumed" if resume else "finished",
        "output_dir": str(point_dir),
        "wall_time_s": round(time.time() - t0, 2),
    }


def _check_point_config(cfg: ExperimentConfig, raw: Any, point: Point) -> list[str]:
    """The point's values really arrived in its configuration (an override on a list item or
    an interpolation might not)."""
    problems = []
    for key, value in point.values.items():
        got = OmegaConf.select(raw, key, default="<missing>")
        if OmegaConf.is_config(got):
            got = OmegaConf.to_container(got, resolve=True)
        if got != value:
            problems.append(f"{key}: set to {value!r} but the configuration holds {got!r}")
    return problems


def plan_sweep(
    exp: str,
    overrides: Sequence[str] | None = None,
    root: str | Path | None = None,
    executor_kind: str | None = None,
) -> tuple[ExperimentConfig, Path, list[Point], list[str]]:
    """Expand the sweep and validate every point's full configuration and its preflight
    (paths, data, callbacks: :mod:`vlcompress.preflight`; for Slurm, a preflight problem is a
    warning: the compute nodes may see paths this host does not); runs nothing.

    Args:
        exp: experiment name or YAML path.
        overrides: ``key=value`` overrides for every point (``output_dir=`` names the sweep
            folder instead; ``resume=`` is ignored: the sweep decides per point).
        root: the experiments folder (default: :func:`experiments_dir`).
        executor_kind: ``slurm`` adds the Slurm consistency checks (nodes, tasks per node).

    Returns:
        The experiment's config (without point overrides), the absolute sweep folder, the
        points and the overrides passed on to every point.

    Raises:
        ConfigError: every problem of every point at once (identical problems are listed once,
            with the points they concern).
    """
    base, out_override = _split_overrides(list(overrides or []))
    root_path = Path(root) if root else None
    cfg, raw = load_experiment(exp, base, root_path)
    sweep_dir = _default_sweep_dir(cfg, out_override).absolute()
    points = expand_points(cfg, raw)
    found: dict[str, list[str]] = {}
    unseen: dict[str, list[str]] = {}  # preflight problems on a submit host (Slurm)
    for p in points:
        try:
            pcfg, praw = load_experiment(
                exp, [*base, *p.overrides, f"output_dir={sweep_dir / p.name}"], root_path
            )
            errors = _check_point_config(pcfg, praw, p)
            if executor_kind == "slurm":
                errors += _slurm_consistency(pcfg)
                for problem in [] if errors else preflight(pcfg):  # paths may be node-local
                    unseen.setdefault(problem, []).append(p.name)
            elif not errors:
                errors = preflight(pcfg)
        except ConfigError as e:
            errors = e.errors
        for err in errors:
            found.setdefault(err, []).append(p.name)
    if found:
        lines = []
        for err, names in found.items():
            which = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            lines.append(f"{err} (point{'s' if len(names) > 1 else ''} {which})")
        raise ConfigError(lines, f"sweep of {exp!r} ({len(points)} points)")
    for problem, names in unseen.items():
        log.warning(
            "not seen from this host (the job checks again on its node and fails if it is "
            "true there): %s (points %s)", problem, ", ".join(names[:3]),
        )  # fmt: skip
    return cfg, sweep_dir, points, base


def _still_active(entry: PointEntry | None, log_folder: Path) -> bool:
    """An earlier submission's Slurm job for this point is still queued or running."""
    if entry is None or entry.executor != "slurm" or not entry.job_id:
        return False
    if entry.state not in ("submitted", "running"):
        return False
    return job_active(log_folder, entry.job_id)


def submit_sweep(
    exp: str,
    overrides: Sequence[str] | None = None,
    executor: str | Any | None = None,
    *,
    wait: bool = True,
    root: str | Path | None = None,
) -> dict[str, Any]:
    """Validate every point, then run (local) or submit (Slurm job array) the unfinished ones.

    Args:
        exp: experiment name or YAML path; its ``sweep:`` section defines the points.
        overrides: ``key=value`` overrides for every point; ``output_dir=`` names the sweep
            folder (else ``sweep.output_dir``, else ``runs/<experiment>/sweep``).
        executor: ``None`` (``sweep.slurm.executor``), ``"auto"``, ``"slurm"``, ``"local"``,
            or a ready submitit executor (its parameters are used as they are; the points are
            submitted as one batch / job array).
        wait: wait for submitted jobs and record their outcome (Slurm / submitit executors);
            with ``False`` the manifest records the job ids and the function returns.
        root: the experiments folder (default: :func:`experiments_dir`).

    Returns:
        The manifest (also written to ``<sweep folder>/sweep.json``): experiment, overrides,
        sweep folder, metric, swept keys, and per point its name, folder, values, overrides,
        state, outcome, job id and error. :func:`summarize` counts the outcomes.

    Raises:
        ConfigError: any point's configuration is invalid (nothing was run or submitted), or
            the executor cannot be used.

    Example:
        >>> m = submit_sweep("default_sweep", ["sweep.slurm.executor=local"])  # doctest: +SKIP
        >>> [p["outcome"] for p in m["points"]]  # doctest: +SKIP
        ['finished', 'finished', 'failed', 'finished']
    """
    import submitit

    probe, _ = load_experiment(exp, _split_overrides(list(overrides or []))[0], root)
    if isinstance(executor, submitit.Executor):
        kind = "slurm" if isinstance(executor, submitit.SlurmExecutor) else "submitit"
        if isinstance(executor, submitit.AutoExecutor):
            kind = "slurm" if executor.cluster == "slurm" else "submitit"
    else:
        kind = resolve_executor(executor or probe.sweep.slurm.executor)
    cfg, sweep_dir, points, base = plan_sweep(exp, overrides, root, kind)
    root_str = str(Path(root).absolute() if root else experiments_dir().absolute())
    log_folder = sweep_dir / "slurm"

    old = Manifest.load(sweep_dir)
    old_points = old.entries() if old else {}
    swept = list(dict.fromkeys(k for p in points for k in p.values))
    manifest = Manifest(
        experiment=exp,
        name=cfg.name,
        experiments_root=root_str,
        overrides=base,
        sweep_dir=str(sweep_dir),
        metric=cfg.sweep.metric,
        keys=[k for k in swept if k != "seed"],
        seed_key="seed" if "seed" in swept else None,
        executor=kind,
        created=old.created if old and old.created is not None else _now(),
        submissions=(old.submissions if old else 0) + 1,
    )
    todo: list[tuple[Point, PointEntry]] = []
    for p in points:
        prev = old_points.get(p.name)
        d = sweep_dir / p.name
        entry = PointEntry(
            name=p.name,
            dir=p.name,
            values=p.values,
            group=p.group,
            overrides=p.overrides,
            attempts=prev.attempts if prev else 0,
            executor=prev.executor if prev and prev.executor is not None else kind,
            job_id=prev.job_id if prev else None,
            started=prev.started if prev else None,
            ended=prev.ended if prev else None,
        )
        manifest.points.append(entry)
        if (d / "results.json").is_file():
            entry.state, entry.outcome = "finished", "skipped"
        elif _still_active(prev, log_folder):
            entry.state, entry.outcome = prev.state, "running"
        else:
            entry.resume = (d / "checkpoints" / "last.ckpt").is_file()
            todo.append((p, entry))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    manifest.write(sweep_dir)
    n_skip = len(points) - len(todo)
    log.info(
        "sweep %s: %d points (%d to run, %d finished or running) in %s [%s]",
        exp, len(points), len(todo), n_skip, sweep_dir, kind,
    )  # fmt: skip

    if kind == "local":
        _run_local(todo, exp, base, sweep_dir, root_str, manifest)
    elif todo:
        if kind == "slurm" and not isinstance(executor, submitit.Executor):
            executor = make_executor(cfg.sweep.slurm, log_folder, job_name=cfg.name)
        _run_submitit(todo, executor, kind, exp, base, sweep_dir, root_str, manifest, wait)
    counts = manifest.summarize()
    log.info("sweep %s: %s", exp, ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return manifest.to_dict()


def _run_local(
    todo: list[tuple[Point, PointEntry]],
    exp: str,
    base: list[str],
    sweep_dir: Path,
    root: str,
    manifest: Manifest,
) -> None:
    for i, (p, entry) in enumerate(todo, 1):
        log.info("point %d/%d: %s%s", i, len(todo), p.name, " (resume)" if entry.resume else "")
        entry.start("local")
        manifest.write(sweep_dir)
        try:
            res = run_point(exp, [*base, *p.overrides], sweep_dir / p.name, root)
        except BaseException as e:
            # Ctrl-C, or a signal the run turned into RunInterrupted (checkpoint saved): the
            # whole sweep stops; a re-submission resumes this point.
            if isinstance(e, Exception) and not _is_interruption(e):
                log.error("point %s failed: %s", p.name, _error_text(e), exc_info=True)
                entry.record("failed", _error_text(e))
                manifest.write(sweep_dir)
                continue
            entry.interrupt(_error_text(e))
            manifest.write(sweep_dir)
            raise
        entry.record(res["outcome"])
        entry.wall_time_s = res["wall_time_s"]
        manifest.write(sweep_dir)


def _run_submitit(
    todo: list[tuple[Point, PointEntry]],
    executor: Any,
    kind: str,
    exp: str,
    base: list[str],
    sweep_dir: Path,
    root: str,
    manifest: Manifest,
    wait: bool,
) -> None:
    import submitit

    with executor.batch():
        jobs = [
            executor.submit(run_point, exp, [*base, *p.overrides], str(sweep_dir / p.name), root)
            for p, _ in todo
        ]
    by_job = {}
    for job, (_, entry) in zip(jobs, todo):
        entry.start(kind, str(job.job_id), submitted=True)
        by_job[id(job)] = entry
    manifest.write(sweep_dir)
    log.info("submitted %d jobs (%s)", len(jobs), ", ".join(str(j.job_id) for j in jobs[:5]))
    if not wait:
        return
    for job in submitit.helpers.as_completed(jobs, poll_frequency=5 if kind == "slurm" else 1):
        entry = by_job[id(job)]
        try:
            res = job.result()
        except Exception as e:
            error = _job_error_text(e, job)
            log.error("point %s (job %s) failed: %s", entry.name, job.job_id, error)
            entry.record("failed", error)
        else:
            entry.record(res["outcome"])
            entry.wall_time_s = res["wall_time_s"]
        manifest.write(sweep_dir)
