"""The manifest of a sweep folder, ``sweep.json``: the sweep's experiment, overrides and swept
keys, and per point its folder, values, state, outcome, job id and error.

:class:`Manifest` and :class:`PointEntry` are its typed form; they read and write the same JSON
keys, in the same order, as the untyped manifests of earlier versions, so old sweep folders
still load (a missing key takes its default, an unknown key is kept).

Example:
    >>> m = Manifest(experiment="default_sweep", points=[PointEntry("seed=0", "seed=0", {})])
    >>> m.points[0].record("finished")
    >>> m.summarize()["finished"], Manifest.from_dict(m.to_dict()) == m
    (1, True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from vlcompress.utils.io import atomic_write_json

__all__ = ["MANIFEST", "OUTCOMES", "Manifest", "PointEntry", "load_manifest", "summarize"]


MANIFEST = "sweep.json"
"""File name of a sweep folder's manifest."""

OUTCOMES = ("finished", "skipped", "resumed", "failed", "submitted", "running")
"""What happened to a point in the latest submission (the manifest's ``outcome``):
ran and finished, was already finished, was resumed from its checkpoint and finished, failed,
was submitted to Slurm without waiting, or was still queued/running from an earlier
submission."""

_OPTIONAL = ("resume", "wall_time_s")  # written only once set


def _now() -> str:
    """The local time, ISO 8601 with its UTC offset, to the second."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _known(cls: type, d: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``d`` split into the dataclass's fields (but ``extra``) and the other keys."""
    names = {f.name for f in fields(cls)} - {"extra"}
    return {k: v for k, v in d.items() if k in names}, {
        k: v for k, v in d.items() if k not in names
    }


@dataclass
class PointEntry:
    """One point's entry in the manifest (``sweep.json``'s ``points``).

    Attributes:
        name: the point's name (see :func:`vlcompress.cluster.points.point_name`).
        dir: its run folder, relative to the sweep folder.
        values: swept config key -> value.
        group: the values as the experiment writes them (``None``: same as ``values``).
        overrides: the ``key=value`` overrides that set ``values``.
        state: ``pending``, ``running``, ``submitted``, ``finished``, ``failed`` or
            ``interrupted``.
        outcome: what happened in the latest submission (one of :data:`OUTCOMES`).
        attempts: how many times the point was run or submitted, all submissions together.
        executor: ``local``, ``slurm`` or ``submitit``.
        job_id: the submitit / Slurm job id of the latest attempt.
        error: the latest attempt's error.
        started: when the latest attempt started (ISO 8601).
        ended: when it ended.
        resume: whether the latest submission resumed it from its checkpoint (only points it
            ran or submitted).
        wall_time_s: the latest run's wall time (only points it ran to the end).
        extra: keys this version does not know (kept as they are).
    """

    name: str
    dir: str
    values: dict[str, Any]
    group: dict[str, Any] | None = None
    overrides: list[str] = field(default_factory=list)
    state: str = "pending"
    outcome: str | None = None
    attempts: int = 0
    executor: str | None = None
    job_id: str | None = None
    error: str | None = None
    started: str | None = None
    ended: str | None = None
    resume: bool | None = None
    wall_time_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PointEntry:
        """An entry read from ``sweep.json`` (``dir`` defaults to ``name``)."""
        known, extra = _known(cls, d)
        known.setdefault("dir", known["name"])
        known.setdefault("values", {})
        known["attempts"] = int(known.get("attempts", 0))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The entry as ``sweep.json`` holds it (``resume``/``wall_time_s`` only once set)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        for key in _OPTIONAL:
            if out[key] is None:
                del out[key]
        return {**out, **self.extra}

    def start(self, executor: str, job_id: str | None = None, *, submitted: bool = False) -> None:
        """A new attempt: running here, or submitted as job ``job_id``."""
        self.state = "submitted" if submitted else "running"
        if submitted:
            self.outcome = "submitted"
        self.executor, self.job_id = executor, job_id
        self.started, self.ended = _now(), None
        self.attempts += 1

    def record(self, outcome: str, error: str | None = None) -> None:
        """The attempt ended with ``outcome`` (``failed`` with ``error``, or a success)."""
        self.outcome = outcome
        self.state = "failed" if outcome == "failed" else "finished"
        self.error = error
        self.ended = _now()

    def interrupt(self, error: str) -> None:
        """The attempt was interrupted (Ctrl-C, a signal): failed, state ``interrupted``."""
        self.state, self.outcome, self.error, self.ended = "interrupted", "failed", error, _now()


@dataclass
class Manifest:
    """A sweep folder's manifest (``sweep.json``).

    Attributes:
        experiment: the experiment's name or YAML path, as given.
        name: the experiment's ``name``.
        experiments_root: the experiments folder (absolute).
        overrides: the overrides passed on to every point.
        sweep_dir: the sweep folder (absolute).
        metric: the ``results.json`` value a report shows (dotted path).
        keys: the swept keys but ``seed``.
        seed_key: ``seed`` when seeds are swept, else ``None``.
        executor: ``local``, ``slurm`` or ``submitit``.
        created: when the sweep was first submitted (ISO 8601).
        submissions: how many times it was submitted.
        points: the points' entries.
        updated: when the manifest was last written.
        extra: keys this version does not know (kept as they are).
    """

    experiment: str = ""
    name: str = ""
    experiments_root: str = ""
    overrides: list[str] = field(default_factory=list)
    sweep_dir: str = ""
    metric: str | None = None
    keys: list[str] = field(default_factory=list)
    seed_key: str | None = None
    executor: str | None = None
    created: str | None = None
    submissions: int = 0
    points: list[PointEntry] = field(default_factory=list)
    updated: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        """A manifest read from ``sweep.json`` (missing keys take their defaults)."""
        known, extra = _known(cls, d)
        known["points"] = [PointEntry.from_dict(p) for p in known.get("points", [])]
        known["submissions"] = int(known.get("submissions", 0))
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as ``sweep.json`` holds it (``updated`` only once written)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out["points"] = [p.to_dict() for p in self.points]
        if out["updated"] is None:
            del out["updated"]
        return {**out, **self.extra}

    @classmethod
    def load(cls, sweep_dir: str | Path) -> Manifest | None:
        """The manifest of a sweep folder, or ``None`` when it has none.

        Args:
            sweep_dir: the sweep folder.

        Returns:
            Its ``sweep.json``, typed.
        """
        raw = load_manifest(sweep_dir)
        return None if raw is None else cls.from_dict(raw)

    def write(self, sweep_dir: str | Path | None = None) -> None:
        """Stamp ``updated`` and write ``sweep.json`` atomically (a crash leaves the old one).

        Args:
            sweep_dir: the sweep folder (default: :attr:`sweep_dir`).
        """
        self.updated = _now()
        atomic_write_json(Path(sweep_dir or self.sweep_dir) / MANIFEST, self.to_dict())

    def entries(self) -> dict[str, PointEntry]:
        """The points' entries by name."""
        return {p.name: p for p in self.points}

    def summarize(self) -> dict[str, int]:
        """How many points had each outcome in the latest submission (see :func:`summarize`)."""
        counts = dict.fromkeys(OUTCOMES, 0)
        for p in self.points:
            if p.outcome in counts:
                counts[p.outcome] += 1
        return counts


def load_manifest(sweep_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of a sweep folder, or ``None`` when it has none.

    Args:
        sweep_dir: the sweep folder.

    Returns:
        The parsed ``sweep.json`` (:meth:`Manifest.load` gives it typed).
    """
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def summarize(manifest: Manifest | Mapping[str, Any]) -> dict[str, int]:
    """How many points had each outcome in the latest submission.

    Args:
        manifest: a sweep manifest (typed, or as ``sweep.json`` holds it).

    Returns:
        ``{outcome: count}`` for every outcome in :data:`OUTCOMES`.
    """
    if isinstance(manifest, Manifest):
        return manifest.summarize()
    counts = dict.fromkeys(OUTCOMES, 0)
    for p in manifest["points"]:
        if p.get("outcome") in counts:
            counts[p["outcome"]] += 1
    return counts
