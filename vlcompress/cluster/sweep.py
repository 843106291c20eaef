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

Example:
    >>> from vlcompress.cluster.sweep import submit_sweep  # doctest: +SKIP
    >>> manifest = submit_sweep("default_sweep", ["trainer.max_epochs=1"])  # doctest: +SKIP
    >>> summarize(manifest)  # doctest: +SKIP
    {'finished': 4, 'skipped': 0, 'resumed': 0, 'failed': 0, 'submitted': 0, 'running': 0}
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from vlcompress.config import ConfigError, ExperimentConfig, load_experiment
from vlcompress.config.load import experiments_dir
from vlcompress.config.schema import SlurmConfig
from vlcompress.preflight import preflight
from vlcompress.utils.io import atomic_write_json

__all__ = [
    "MANIFEST",
    "OUTCOMES",
    "Point",
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

MANIFEST = "sweep.json"
"""File name of a sweep folder's manifest."""

POINT_SEEDS = "seeds"
"""Key of an explicit point that gives that point its own seeds."""

OUTCOMES = ("finished", "skipped", "resumed", "failed", "submitted", "running")
"""What happened to a point in the latest submission (the manifest's ``outcome``):
ran and finished, was already finished, was resumed from its checkpoint and finished, failed,
was submitted to Slurm without waiting, or was still queued/running from an earlier
submission."""

_RESERVED = ("output_dir", "resume", "sweep")
_ACTIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"}
_NAME_OK = re.compile(r"[^A-Za-z0-9._=,+\-]")
_MAX_NAME = 120


@dataclass
class Point:
    """One point of a sweep.

    Attributes:
        name: its folder name under the sweep folder (see :func:`point_name`).
        values: swept config key -> value (``seed`` last when seeds are swept).
        overrides: ``key=value`` overrides that set ``values``.
        group: the values as the experiment writes them (interpolations such as
            ``init_from: runs/dense/seed=${seed}`` unresolved): a report averages the points of
            one group over seeds; ``None`` when no value was interpolated.
    """

    name: str
    values: dict[str, Any]
    overrides: list[str] = field(default_factory=list)
    group: dict[str, Any] | None = None


def format_override(key: str, value: Any) -> str:
    """A ``key=value`` override that sets ``key`` to exactly ``value``.

    Args:
        key: dotted config key.
        value: any YAML-representable value (strings that would read as another type are
            quoted).

    Returns:
        The override string.

    Example:
        >>> format_override("optim.lr", 3e-4), format_override("data.options.split", "1.0")
        ('optim.lr=0.0003', 'data.options.split="1.0"')
    """
    if isinstance(value, str):
        try:
            plain = yaml.safe_load(value) == value and "${" not in value
        except yaml.YAMLError:
            plain = False
        return f"{key}={value}" if plain else f"{key}={json.dumps(value)}"
    return f"{key}={json.dumps(value)}"


def _flat_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def point_name(values: dict[str, Any]) -> str:
    """A stable, readable folder name for a point, e.g. ``optim.lr=0.001,seed=0``.

    Characters other than letters, digits and ``._=,+-`` become ``_``; a name longer than
    120 characters is cut and ends with a short hash of the full name.

    Args:
        values: swept config key -> value, in the order the name should list them.

    Returns:
        The folder name (``default`` when ``values`` is empty).

    Example:
        >>> point_name({"optim.lr": 0.001, "data.options.split": "cp v2", "seed": 0})
        'optim.lr=0.001,data.options.split=cp_v2,seed=0'
    """
    full = ",".join(f"{k}={_flat_value(v)}" for k, v in values.items()) or "default"
    name = _NAME_OK.sub("_", full)
    if name.startswith((".", "_", "-")):
        name = "p" + name
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(full.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_NAME - 9]}~{digest}"
    return name


def flatten_grid(grid: dict[str, Any], prefix: str = "") -> tuple[dict[str, list[Any]], list[str]]:
    """Flatten a grid whose keys are dotted (``{"optim.lr": [...]}``), nested
    (``{"optim": {"lr": [...]}}``) or both, down to the lists of values.

    Args:
        grid: the ``sweep.grid`` mapping.
        prefix: key prefix (used by the recursion).

    Returns:
        The flat grid (dotted key -> non-empty list of values) and the problems found
        (a leaf that is not a list, an empty list, a key given twice).

    Example:
        >>> flatten_grid({"optim": {"lr": [1, 2]}, "seed": [0]})
        ({'optim.lr': [1, 2], 'seed': [0]}, [])
    """
    flat: dict[str, list[Any]] = {}
    problems: list[str] = []
    for k, v in grid.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            sub, sub_problems = flatten_grid(v, f"{key}.")
            problems += sub_problems
        elif isinstance(v, (list, tuple)):
            sub = {key: list(v)} if v else {}
            if not v:
                problems.append(f"sweep.grid.{key}: an empty list of values")
        else:
            sub = {}
            problems.append(
                f"sweep.grid.{key}: must be a list of values, got {v!r} (write [{v!r}])"
            )
        for sk, sv in sub.items():
            if sk in flat:
                problems.append(f"sweep.grid.{sk}: given twice (dotted and nested)")
            flat[sk] = sv
    return flat, problems


def _flatten_point(point: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in point.items():
        if isinstance(v, dict) and v and prefix + k not in ("model.options",):
            # nested spelling {optim: {lr: 1}}; a dict *value* is written with a dotted key
            flat.update(_flatten_point(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def expand_points(cfg: ExperimentConfig, raw: Any = None) -> list[Point]:
    """The points of ``cfg.sweep``: explicit points x grid combinations x seeds.

    An explicit point may carry its own ``seeds: [...]`` (replacing ``sweep.seeds`` for it),
    e.g. 3 seeds at the 50% point of a sparsity sweep and 1 elsewhere.

    With ``raw`` (the experiment's unresolved OmegaConf tree, from :func:`load_experiment`),
    interpolations in swept values are resolved *per point*, after its seed and other values
    are set: ``init_from: "runs/dense/seed=${seed}"`` follows each point's seed. Without it
    they hold what the experiment's own seed gave them.

    Keys are ordered alphabetically with ``seed`` last, so a point keeps its folder name when
    the YAML is reordered.

    Args:
        cfg: the experiment (its ``sweep`` section).

    Returns:
        The points, in a stable order (seeds vary fastest).

    Raises:
        ConfigError: an empty sweep section, a grid leaf that is not a list, a swept key
            the sweep itself controls (``output_dir``, ``resume``, ``sweep.*``), ``seed`` both
            in the grid/points and in ``seeds``, a point's own ``seeds`` that are not a
            non-empty list of distinct integers (or given without ``sweep.seeds``), an
            interpolation that cannot be resolved, or two points with the same values.

    Example:
        >>> from vlcompress.config import load_experiment
        >>> cfg, _ = load_experiment("default_sweep")
        >>> [p.name for p in expand_points(cfg)]  # doctest: +NORMALIZE_WHITESPACE
        ['optim.lr=0.001,seed=0', 'optim.lr=0.001,seed=1',
         'optim.lr=0.0003,seed=0', 'optim.lr=0.0003,seed=1']
    """
    sw = cfg.sweep
    grid_in, points_in = dict(sw.grid), [dict(p) for p in sw.points]
    if raw is not None and OmegaConf.select(raw, "sweep") is not None:
        unresolved = OmegaConf.to_container(raw.sweep, resolve=False)
        grid_in = dict(unresolved.get("grid") or {})
        points_in = [dict(p) for p in unresolved.get("points") or []]
    grid, problems = flatten_grid(grid_in)
    explicit: list[dict[str, Any]] = []
    point_seeds: list[list[int] | None] = []
    for i, given in enumerate(points_in):
        given = dict(given)
        own = given.pop(POINT_SEEDS, None)
        if own is not None:
            own = list(own) if isinstance(own, (list, tuple)) else own
            if (
                not isinstance(own, list)
                or not own
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in own)
            ):
                problems.append(
                    f"sweep.points[{i}].{POINT_SEEDS}: a non-empty list of integer seeds, "
                    f"got {own!r}"
                )
                own = None
            elif not sw.seeds:
                problems.append(
                    f"sweep.points[{i}].{POINT_SEEDS}: per-point seeds replace sweep.seeds "
                    "for that point; give sweep.seeds for the others too"
                )
            elif len(set(own)) != len(own):
                problems.append(f"sweep.points[{i}].{POINT_SEEDS}: repeated seeds in {own}")
        explicit.append(_flatten_point(given))
        point_seeds.append(own)
    if not explicit:
        explicit, point_seeds = [{}], [None]
    swept = set(grid) | {k for p in explicit for k in p}
    for key in sorted(swept):
        if key.split(".")[0] in _RESERVED:
            problems.append(f"sweep: {key!r} cannot be swept (the sweep sets it per point)")
    if sw.seeds and "seed" in swept:
        problems.append("sweep: 'seed' is swept in grid/points and in sweep.seeds; use one")
    if len(set(sw.seeds)) != len(sw.seeds):
        problems.append(f"sweep.seeds: repeated seeds in {list(sw.seeds)}")
    if not grid and not sw.points and not sw.seeds:
        problems.append(
            "the experiment has no sweep: section (give sweep.grid, sweep.points and/or "
            "sweep.seeds)"
        )
    if problems:
        raise ConfigError(problems, "sweep")

    def order(k: str) -> tuple[bool, str]:
        return (k == "seed", k)

    points: list[Point] = []
    combos = list(itertools.product(*grid.values())) if grid else [()]
    for base, own_seeds in zip(explicit, point_seeds):
        for combo in combos:
            for seed in own_seeds or sw.seeds or [None]:
                values = {**base, **dict(zip(grid, combo))}
                if seed is not None:
                    values["seed"] = seed
                values = {k: values[k] for k in sorted(values, key=order)}
                written = values
                if raw is not None:
                    values = _resolve_values(raw, values)
                points.append(
                    Point(
                        name=point_name(values),
                        values=values,
                        overrides=[format_override(k, v) for k, v in values.items()],
                        group=written if written != values else None,
                    )
                )
    seen: dict[str, Point] = {}
    for p in points:
        if p.name in seen:
            if seen[p.name].values == p.values:
                raise ConfigError([f"sweep: point {p.values} appears twice"], "sweep")
            p.name = f"{p.name}~{hashlib.sha1(repr(p.values).encode()).hexdigest()[:8]}"
        seen[p.name] = p
    return points


def _resolve_values(raw: Any, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with their interpolations (``${seed}``, ``${loss.name}``) resolved in the
    experiment's tree once the point's other values are set."""

    def interpolated(v: Any) -> bool:
        return "${" in json.dumps(v, default=str)

    todo = [k for k, v in values.items() if interpolated(v)]
    if not todo:
        return values
    tree = OmegaConf.create(OmegaConf.to_container(raw, resolve=False))
    OmegaConf.set_struct(tree, False)
    for k, v in values.items():
        if k not in todo:
            OmegaConf.update(tree, k, v, merge=False)
    tree["_sweep_point_"] = {str(i): values[k] for i, k in enumerate(todo)}
    try:
        done = OmegaConf.to_container(tree["_sweep_point_"], resolve=True)
    except Exception as e:  # a missing key, a bad resolver
        problem = f"sweep: cannot resolve {[values[k] for k in todo]}: {e}"
        raise ConfigError([problem], "sweep") from e
    return {k: done[str(todo.index(k))] if k in todo else v for k, v in values.items()}


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


def time_to_minutes(value: str | int) -> int:
    """Slurm's time formats in minutes (seconds round up).

    Args:
        value: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` or ``D-HH:MM:SS``
            (or an int of minutes).

    Returns:
        Whole minutes, at least 1.

    Raises:
        ValueError: an unreadable time.

    Example:
        >>> time_to_minutes("01:30:00"), time_to_minutes("1-00:00:30"), time_to_minutes("90")
        (90, 1441, 90)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return max(1, value)
    s = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ValueError(f"cannot read the time {value!r}; use HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = a, b or 0, c or 0
    elif c is not None:  # HH:MM:SS
        hours, minutes, seconds = a, b, c
    elif b is not None:  # MM:SS
        hours, minutes, seconds = 0, a, b
    else:  # MM
        hours, minutes, seconds = 0, a, 0
    total = ((days or 0) * 24 + hours) * 60 + minutes + (1 if seconds else 0)
    return max(1, total)


def slurm_parameters(slurm: SlurmConfig, job_name: str = "vlcompress") -> dict[str, Any]:
    """The :meth:`submitit.AutoExecutor.update_parameters` arguments for ``sweep.slurm``.

    Args:
        slurm: the ``sweep.slurm`` section.
        job_name: the Slurm job name.

    Returns:
        Keyword arguments: ``name``, ``timeout_min``, ``nodes``, ``tasks_per_node``,
        ``cpus_per_task``, ``gpus_per_node`` (only when > 0), ``mem_gb`` (when set),
        ``slurm_partition`` (when set), ``slurm_array_parallelism`` and
        ``slurm_additional_parameters`` (``sweep.slurm.additional``, any other sbatch option).

    Raises:
        ConfigError: an unreadable ``sweep.slurm.time``.

    Example:
        >>> slurm_parameters(SlurmConfig(partition="gpu", gpus_per_node=4))["gpus_per_node"]
        4
    """
    try:
        minutes = time_to_minutes(slurm.time)
    except ValueError as e:
        raise ConfigError([f"sweep.slurm.time: {e}"], "sweep") from e
    params: dict[str, Any] = {
        "name": job_name,
        "timeout_min": minutes,
        "nodes": slurm.nodes,
        "tasks_per_node": slurm.tasks_per_node,
        "cpus_per_task": slurm.cpus_per_task,
        "slurm_array_parallelism": slurm.array_parallelism,
        "slurm_additional_parameters": dict(slurm.additional),
    }
    if slurm.gpus_per_node:
        params["gpus_per_node"] = slurm.gpus_per_node
    if slurm.mem_gb is not None:
        params["mem_gb"] = slurm.mem_gb
    if slurm.partition:
        params["slurm_partition"] = slurm.partition
    return params


def resolve_executor(kind: str) -> str:
    """``auto`` -> ``slurm`` when ``sbatch`` is on the PATH, else ``local``.

    Args:
        kind: ``auto``, ``slurm`` or ``local``.

    Returns:
        ``slurm`` or ``local``.

    Raises:
        ConfigError: an unknown kind, or ``slurm`` without ``sbatch`` on the PATH.
    """
    if kind == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if kind not in ("slurm", "local"):
        raise ConfigError(
            [f"executor {kind!r}: use 'auto', 'slurm' or 'local' (or a submitit executor)"],
            "sweep",
        )
    if kind == "slurm" and not shutil.which("sbatch"):
        raise ConfigError(
            ["executor 'slurm' but sbatch is not on the PATH; use sweep.slurm.executor=local"],
            "sweep",
        )
    return kind


def make_executor(slurm: SlurmConfig, folder: str | Path, job_name: str = "vlcompress") -> Any:
    """A submitit Slurm executor configured from ``sweep.slurm`` (nothing is submitted).

    Args:
        slurm: the ``sweep.slurm`` section.
        folder: where submitit writes its job files and logs (``%j`` is the job id).
        job_name: the Slurm job name.

    Returns:
        A :class:`submitit.AutoExecutor` for the ``slurm`` cluster.

    Raises:
        RuntimeError: submitit finds no Slurm (no ``srun``).
        ConfigError: an unreadable ``sweep.slurm.time``.
    """
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    executor.update_parameters(**slurm_parameters(slurm, job_name))
    return executor


def load_manifest(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a sweep folder, or ``None`` when it has none.

    Args:
        sweep_dir: the sweep folder.

    Returns:
        The parsed ``sweep.json``.
    """
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(manifest: dict[str, Any]) -> dict[str, int]:
    """How many points had each outcome in the latest submission.

    Args:
        manifest: a sweep manifest.

    Returns:
        ``{outcome: count}`` for every outcome in :data:`OUTCOMES`.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    for p in manifest["points"]:
        if p.get("outcome") in counts:
            counts[p["outcome"]] += 1
    return counts


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


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


def _slurm_consistency(cfg: ExperimentConfig) -> list[str]:
    s, t = cfg.sweep.slurm, cfg.trainer
    problems = []
    if isinstance(t.num_nodes, int) and s.nodes != t.num_nodes:
        problems.append(
            f"sweep.slurm.nodes={s.nodes} but trainer.num_nodes={t.num_nodes}; set both"
        )
    if isinstance(t.devices, int) and t.devices != s.tasks_per_node:
        problems.append(
            f"sweep.slurm.tasks_per_node={s.tasks_per_node} but trainer.devices={t.devices} "
            "(Lightning needs one task per device); set both"
        )
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


def _write(sweep_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = _now()
    atomic_write_json(sweep_dir / MANIFEST, manifest)


def _still_active(entry: dict[str, Any], log_folder: Path) -> bool:
    """An earlier submission's Slurm job for this point is still queued or running."""
    if entry.get("executor") != "slurm" or not entry.get("job_id"):
        return False
    if entry.get("state") not in ("submitted", "running"):
        return False
    try:
        import submitit

        state = submitit.SlurmJob(folder=str(log_folder), job_id=entry["job_id"]).state
    except Exception as e:  # no sacct, job unknown to Slurm: treat as gone
        log.warning("cannot read the state of job %s: %s", entry["job_id"], e)
        return False
    return state.split()[0].upper() in _ACTIVE_SLURM


def _record(entry: dict[str, Any], outcome: str, error: str | None = None) -> None:
    entry["outcome"] = outcome
    entry["state"] = "failed" if outcome == "failed" else "finished"
    entry["error"] = error
    entry["ended"] = _now()


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

    old = load_manifest(sweep_dir) or {}
    old_points = {p["name"]: p for p in old.get("points", [])}
    swept = list(dict.fromkeys(k for p in points for k in p.values))
    manifest: dict[str, Any] = {
        "experiment": exp,
        "name": cfg.name,
        "experiments_root": root_str,
        "overrides": base,
        "sweep_dir": str(sweep_dir),
        "metric": cfg.sweep.metric,
        "keys": [k for k in swept if k != "seed"],
        "seed_key": "seed" if "seed" in swept else None,
        "executor": kind,
        "created": old.get("created", _now()),
        "submissions": int(old.get("submissions", 0)) + 1,
        "points": [],
    }
    todo: list[tuple[Point, dict[str, Any]]] = []
    for p in points:
        prev = old_points.get(p.name, {})
        d = sweep_dir / p.name
        entry = {
            "name": p.name,
            "dir": p.name,
            "values": p.values,
            "group": p.group,
            "overrides": p.overrides,
            "state": "pending",
            "outcome": None,
            "attempts": int(prev.get("attempts", 0)),
            "executor": prev.get("executor", kind),
            "job_id": prev.get("job_id"),
            "error": None,
            "started": prev.get("started"),
            "ended": prev.get("ended"),
        }
        manifest["points"].append(entry)
        if (d / "results.json").is_file():
            entry["state"], entry["outcome"] = "finished", "skipped"
            entry["error"] = None
        elif _still_active(prev, log_folder):
            entry["state"], entry["outcome"] = prev["state"], "running"
        else:
            entry["resume"] = (d / "checkpoints" / "last.ckpt").is_file()
            todo.append((p, entry))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write(sweep_dir, manifest)
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
    counts = summarize(manifest)
    log.info("sweep %s: %s", exp, ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return manifest


def _run_local(
    todo: list[tuple[Point, dict[str, Any]]],
    exp: str,
    base: list[str],
    sweep_dir: Path,
    root: str,
    manifest: dict[str, Any],
) -> None:
    for i, (p, entry) in enumerate(todo, 1):
        log.info("point %d/%d: %s%s", i, len(todo), p.name, " (resume)" if entry["resume"] else "")
        entry.update(state="running", executor="local", job_id=None, started=_now(), ended=None)
        entry["attempts"] += 1
        _write(sweep_dir, manifest)
        try:
            res = run_point(exp, [*base, *p.overrides], sweep_dir / p.name, root)
        except BaseException as e:
            # Ctrl-C, or a signal the run turned into RunInterrupted (checkpoint saved): the
            # whole sweep stops; a re-submission resumes this point.
            if isinstance(e, Exception) and not _is_interruption(e):
                log.error("point %s failed: %s", p.name, _error_text(e), exc_info=True)
                _record(entry, "failed", _error_text(e))
                _write(sweep_dir, manifest)
                continue
            entry.update(state="interrupted", outcome="failed", error=_error_text(e), ended=_now())
            _write(sweep_dir, manifest)
            raise
        _record(entry, res["outcome"])
        entry["wall_time_s"] = res["wall_time_s"]
        _write(sweep_dir, manifest)


def _run_submitit(
    todo: list[tuple[Point, dict[str, Any]]],
    executor: Any,
    kind: str,
    exp: str,
    base: list[str],
    sweep_dir: Path,
    root: str,
    manifest: dict[str, Any],
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
        entry.update(
            state="submitted", outcome="submitted", executor=kind, job_id=str(job.job_id),
            started=_now(), ended=None,
        )  # fmt: skip
        entry["attempts"] += 1
        by_job[id(job)] = entry
    _write(sweep_dir, manifest)
    log.info("submitted %d jobs (%s)", len(jobs), ", ".join(str(j.job_id) for j in jobs[:5]))
    if not wait:
        return
    for job in submitit.helpers.as_completed(jobs, poll_frequency=5 if kind == "slurm" else 1):
        entry = by_job[id(job)]
        try:
            res = job.result()
        except Exception as e:
            error = _job_error_text(e, job)
            log.error("point %s (job %s) failed: %s", entry["name"], job.job_id, error)
            _record(entry, "failed", error)
        else:
            _record(entry, res["outcome"])
            entry["wall_time_s"] = res["wall_time_s"]
        _write(sweep_dir, manifest)
