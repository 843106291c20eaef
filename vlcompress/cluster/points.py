"""The points of a sweep: ``sweep.grid`` (every combination) x ``sweep.points`` (explicit
points) x ``sweep.seeds`` (every point once per seed), their folder names and the overrides
that set them.

Example:
    >>> point_name({"optim.lr": 0.001, "seed": 0}), format_override("optim.lr", 3e-4)
    ('optim.lr=0.001,seed=0', 'optim.lr=0.0003')
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from omegaconf import OmegaConf

from vlcompress.config import ConfigError, ExperimentConfig

__all__ = [
    "POINT_SEEDS",
    "Point",
    "expand_points",
    "flatten_grid",
    "format_override",
    "point_name",
]

POINT_SEEDS = "seeds"
"""Key of an explicit point that gives that point its own seeds."""

_RESERVED = ("output_dir", "resume", "sweep")
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
