"""Sweep reports: every point's ``results.json`` in one table (mean ± std over seeds) and plots.

``make report SWEEP=<folder>`` reads the sweep folder's ``sweep.json`` (or, without one, every
sub-folder holding a ``config.yaml``; the swept keys are then the config values that differ
between them), groups the points by their swept keys other than ``seed``, and writes into the
sweep folder:

* ``report.csv`` and ``report.md``: one row per group, the swept values, ``n`` (points with a
  result), ``mean``, ``std`` (sample standard deviation over seeds, n - 1; empty for n = 1),
  ``min``, ``max``, the per-seed values and how many points have no result;
* ``report_<metric>_vs_<key>.png`` for every swept key: the metric against that key, one line
  per combination of the other keys, error bars = std.

Points that failed, are unfinished or lack the metric are listed under the table (and in the
``missing`` column), never silently dropped.

Example:
    >>> from vlcompress.cluster.report import build_report, write_report  # doctest: +SKIP
    >>> report = build_report("runs/default_sweep/sweep")  # doctest: +SKIP
    >>> write_report(report)  # doctest: +SKIP
    {'csv': ..., 'md': ..., 'png': [...]}
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from vlcompress.utils.io import atomic_write_text
from vlcompress.utils.mappings import flatten
from vlcompress.utils.plots import save_figure

__all__ = ["Report", "build_report", "lookup", "report_table", "write_report"]

log = logging.getLogger(__name__)

_NOT_SWEPT = {"output_dir", "resume", "name", "sweep"}


@dataclass
class Report:
    """An aggregated sweep.

    Attributes:
        sweep_dir: the sweep folder.
        metric: the reported results.json value (dotted path).
        keys: swept keys other than the seed, in column order.
        seed_key: the key averaged over (``seed``), or ``None``.
        rows: one per group: ``values`` (key -> value), ``n``, ``mean``, ``std``, ``min``,
            ``max``, ``per_seed`` (seed -> metric) and ``missing`` (points without a result).
        problems: one line per failed, unfinished or metric-less point.
        points: every point: ``name``, ``values``, ``state``, ``error``, ``metric``.
    """

    sweep_dir: Path
    metric: str
    keys: list[str]
    seed_key: str | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)


def lookup(obj: Any, dotted: str) -> Any:
    """``obj["a"]["b"]`` for ``"a.b"``; ``None`` when a part is missing.

    Args:
        obj: nested mappings (e.g. a parsed results.json).
        dotted: the path.

    Returns:
        The value or ``None``.

    Example:
        >>> lookup({"test": {"accuracy": 0.5}}, "test.accuracy")
        0.5
    """
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _points_from_folders(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Points and swept keys of a sweep folder without a manifest (from each config.yaml)."""
    flats: dict[str, dict[str, Any]] = {}
    for d in sorted(p for p in sweep_dir.iterdir() if p.is_dir()):
        if d.name.startswith(("_", ".")) or not (d / "config.yaml").is_file():
            continue
        cfg = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=False)
        flats[d.name] = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] not in _NOT_SWEPT}
    all_keys = sorted({k for f in flats.values() for k in f})
    swept = [
        k
        for k in all_keys
        if len({json.dumps(f.get(k), sort_keys=True) for f in flats.values()}) > 1
    ]
    points = [
        {"name": n, "dir": n, "values": {k: f.get(k) for k in swept}, "state": None}
        for n, f in flats.items()
    ]
    return points, swept


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def build_report(sweep_dir: str | Path, metric: str | None = None) -> Report:
    """Aggregate a sweep folder's points.

    Args:
        sweep_dir: the sweep folder (holding ``sweep.json``, or point folders).
        metric: dotted path in ``results.json`` (default: the sweep's ``sweep.metric``, else
            ``test.accuracy``).

    Returns:
        The :class:`Report` (nothing is written).

    Raises:
        FileNotFoundError: ``sweep_dir`` is not a folder or holds no points.

    Example:
        >>> r = build_report("runs/default_sweep/sweep", "test.accuracy")  # doctest: +SKIP
        >>> r.rows[0]["values"], r.rows[0]["n"], r.rows[0]["mean"]  # doctest: +SKIP
        ({'optim.lr': 0.001}, 2, 0.61)
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {sweep_dir}")
    manifest = _read_json(sweep_dir / "sweep.json")
    if manifest:
        points = [dict(p) for p in manifest.get("points", [])]
        swept = [
            *manifest.get("keys", []),
            *([manifest["seed_key"]] if manifest.get("seed_key") else []),
        ]
        metric = metric or manifest.get("metric") or "test.accuracy"
    else:
        points, swept = _points_from_folders(sweep_dir)
        metric = metric or "test.accuracy"
    if not points:
        raise FileNotFoundError(
            f"{sweep_dir} holds no sweep: neither {sweep_dir / 'sweep.json'} nor point folders "
            "with a config.yaml"
        )
    seed_key = "seed" if "seed" in swept else None
    keys = [k for k in swept if k != seed_key]
    report = Report(sweep_dir, metric, keys, seed_key)

    groups: dict[str, dict[str, Any]] = {}
    for p in points:
        results = _read_json(sweep_dir / p.get("dir", p["name"]) / "results.json")
        value = lookup(results, metric) if results else None
        if results and value is None:
            problem = f"results.json has no {metric!r}"
        elif results and not isinstance(value, (int, float)):
            problem, value = f"{metric!r} is not a number ({value!r})", None
        elif results is None:
            state = p.get("state")
            error = p.get("error")
            problem = (
                f"failed: {error}"
                if state == "failed" or error
                else f"no results.json ({state or 'not run'})"
            )
        else:
            problem = None
        p["metric"] = float(value) if value is not None else None
        blind = (results or {}).get("blind") or {}
        report.points.append(p)
        if problem:
            report.problems.append(f"{p['name']}: {problem.splitlines()[0]}")
        gvals = {k: (p.get("group") or p["values"]).get(k) for k in keys}
        g = groups.setdefault(
            json.dumps(gvals, sort_keys=True, default=str),
            {"values": gvals, "per_seed": {}, "missing": 0, "_vals": [], "blind": 0},
        )
        g["blind"] += bool(blind.get("answers_without_image"))
        if p["metric"] is None:
            g["missing"] += 1
        else:
            g["_vals"].append(p["metric"])
            seed = p["values"].get(seed_key) if seed_key else len(g["per_seed"])
            g["per_seed"][str(seed)] = p["metric"]
    for g in groups.values():
        vals = g.pop("_vals")
        g["n"] = len(vals)
        g["mean"] = statistics.fmean(vals) if vals else None
        g["std"] = statistics.stdev(vals) if len(vals) > 1 else None
        g["min"] = min(vals) if vals else None
        g["max"] = max(vals) if vals else None
        report.rows.append(g)
    return report


def _header(report: Report) -> list[str]:
    return [*report.keys, "n", "mean", "std", "min", "max", "per seed", "missing", "image"]


def _image_cell(row: dict[str, Any]) -> str:
    """``"BLIND k/n"`` when k of the group's runs answer without the image (their balanced
    accuracy within ``BLIND_MARGIN`` of a constant answer per type), else empty."""
    return f"BLIND {row['blind']}/{row['n'] + row['missing']}" if row.get("blind") else ""


def _cells(report: Report, row: dict[str, Any]) -> list[str]:
    per_seed = " ".join(f"{s}:{v:.4f}" for s, v in row["per_seed"].items())
    return [
        *(_fmt(row["values"][k]) for k in report.keys),
        str(row["n"]),
        _num(row["mean"]),
        _num(row["std"]),
        _num(row["min"]),
        _num(row["max"]),
        per_seed,
        str(row["missing"]),
        _image_cell(row),
    ]


def report_table(report: Report) -> Any:
    """A rich table of the report (the CLI prints it).

    Args:
        report: from :func:`build_report`.

    Returns:
        A :class:`rich.table.Table`.
    """
    from rich.table import Table

    table = Table(
        title=f"sweep {report.sweep_dir}: {report.metric}"
        + (f" (mean ± std over {report.seed_key}s)" if report.seed_key else "")
    )
    blind = [row for row in report.rows if row.get("blind")]
    for h in _header(report)[:-1]:  # runs without the image: marked on the mean (width)
        table.add_column(h, justify="left" if h in report.keys or h == "per seed" else "right")
    for row in report.rows:
        cells = _cells(report, row)[:-1]
        if row.get("blind"):
            mean = len(report.keys) + 1
            cells[mean] = f"[red]{cells[mean]} ({_image_cell(row)})[/red]"
        table.add_row(*cells)
    if blind:
        from vlcompress.metrics.blind import BLIND_MARGIN

        table.caption = (
            f"BLIND k/n: k of the group's n runs answer without the image (balanced accuracy "
            f"within {BLIND_MARGIN} of a constant answer per question type)"
        )
    return table


def _markdown(report: Report, title: str = "# Sweep report") -> str:
    head = _header(report)
    lines = [
        f"{title}: {report.metric}",
        "",
        f"Sweep folder: `{report.sweep_dir}`. Mean ± sample std (n - 1) over "
        f"{report.seed_key + 's' if report.seed_key else 'points'}.",
        "",
        "| " + " | ".join(head) + " |",
        "|"
        + "|".join("---" if h in report.keys or h == "per seed" else "---:" for h in head)
        + "|",
    ]
    for row in report.rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(report, row)) + " |")
    if any(row.get("blind") for row in report.rows):
        from vlcompress.metrics.blind import BLIND_MARGIN

        lines += [
            "",
            "BLIND k/n: k of the group's n runs answer without the image (balanced accuracy "
            f"within {BLIND_MARGIN} of a constant answer per question type); their numbers "
            "come from the question alone.",
        ]
    if report.problems:
        sub = "#" * (len(title) - len(title.lstrip("#")) + 1)
        lines += ["", f"{sub} Points without a result ({len(report.problems)})", ""]
        lines += [f"- {p}" for p in report.problems]
    return "\n".join(lines) + "\n"


def _csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [*report.keys, "n", "mean", "std", "min", "max", "per_seed", "missing", "answers_blind"]
    )
    for row in report.rows:
        w.writerow(
            [
                *(_fmt(row["values"][k]) for k in report.keys),
                row["n"],
                "" if row["mean"] is None else repr(row["mean"]),
                "" if row["std"] is None else repr(row["std"]),
                "" if row["min"] is None else repr(row["min"]),
                "" if row["max"] is None else repr(row["max"]),
                json.dumps(row["per_seed"]),
                row["missing"],
                row.get("blind", 0),
            ]
        )
    return buf.getvalue()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def _baseline_label(base: Report, row: dict[str, Any]) -> str:
    values = ", ".join(
        f"{k}={_fmt(row['values'][k])}" for k in base.keys if row["values"].get(k) is not None
    )
    return f"{base.sweep_dir.name}: {values}" if values else base.sweep_dir.name


def _plot(report: Report, x: str, path: Path, baselines: Report | None = None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [k for k in report.keys if k != x]
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in report.rows:
        if row["mean"] is None:
            continue
        label = ", ".join(f"{k}={_fmt(row['values'][k])}" for k in others) or report.metric
        lines.setdefault(label, []).append(row)
    if not lines:
        return False
    xs_all = [r["values"][x] for rows in lines.values() for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs_all)
    categories = sorted({_fmt(v) for v in xs_all}) if not numeric else []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["values"][x] if numeric else _fmt(r["values"][x]))
        xs = [r["values"][x] if numeric else categories.index(_fmt(r["values"][x])) for r in rows]
        ys = [r["mean"] for r in rows]
        err = [r["std"] or 0.0 for r in rows]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=4, label=label)
    for k, row in enumerate(
        r for r in (baselines.rows if baselines else []) if r["mean"] is not None
    ):
        style = dict(color=f"C{(len(lines) + k) % 10}", linestyle="--", linewidth=1.2)
        ax.axhline(row["mean"], label=_baseline_label(baselines, row), **style)
        if row["std"]:
            ax.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], alpha=0.08,
                       color=style["color"])  # fmt: skip
    if numeric:
        pos = [float(v) for v in xs_all if v > 0]
        if len(pos) == len(xs_all) and max(pos) / min(pos) >= 10:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(categories)), categories, rotation=20)
    ax.set_xlabel(x)
    ax.set_ylabel(
        report.metric + (f" (mean ± std over {report.seed_key}s)" if report.seed_key else "")
    )
    ax.set_title(f"{report.sweep_dir.name}: {report.metric} vs {x}")
    ax.grid(alpha=0.3)
    if baselines is not None and baselines.rows:  # many lines: the legend beside the plot
        fig.set_size_inches(10.5, 4.6)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif len(lines) > 1 or others:
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def write_report(
    report: Report, x: str | None = None, baselines: Report | None = None
) -> dict[str, Any]:
    """Write ``report.csv``, ``report.md`` and the PNG plots into the sweep folder.

    Args:
        report: from :func:`build_report`.
        x: plot only against this swept key (default: one plot per swept key).
        baselines: another sweep's report (e.g. the dense models of a pruning sweep): each of
            its rows is drawn as a dashed line (± std band) and listed under the table.

    Returns:
        ``{"csv": path, "md": path, "png": [paths]}``.

    Raises:
        ValueError: ``x`` is not a swept key.
    """
    if x is not None and x not in report.keys:
        raise ValueError(
            f"--x {x!r} is not a swept key; the swept keys are: {', '.join(report.keys) or '(none)'}"
        )
    out = report.sweep_dir
    atomic_write_text(out / "report.csv", _csv(report))
    md = _markdown(report)
    if baselines is not None:
        md += "\n" + _markdown(baselines, title="## Baselines")
    atomic_write_text(out / "report.md", md)
    pngs = []
    for key in [x] if x else report.keys:
        path = out / f"report_{_safe(report.metric)}_vs_{_safe(key)}.png"
        if _plot(report, key, path, baselines):
            pngs.append(path)
    log.info("report written to %s (%d plot(s))", out / "report.md", len(pngs))
    return {"csv": out / "report.csv", "md": out / "report.md", "png": pngs}
