"""Plots: a run's training curves (PNG, from Lightning's ``metrics.csv``), a slimmable run's
submodels (accuracy against MACs), a skipping search's gate trajectories and saving figures."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from vlcompress.utils.io import atomic_write_bytes


def _series(rows: list[dict[str, str]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(y) not in (None, "") and r.get(x) not in (None, ""):
            xs.append(float(r[x]))
            ys.append(float(r[y]))
    return xs, ys


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path, title: str = "") -> bool:
    """Plot training loss per step and validation loss/accuracy per epoch. Returns False when
    the CSV has nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(metrics_csv)
    if not path.is_file():
        return False
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train/loss", "train loss"), ("val/loss", "val loss")):
        xs, ys = _series(rows, "step", key)
        if xs:
            ax_loss.plot(xs, ys, label=label, marker="o" if key.startswith("val") else None)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    xs, ys = _series(rows, "epoch", "val/acc")
    if xs:
        ax_acc.plot([x + 1 for x in xs], ys, marker="o", label="val accuracy (VQA)")
    xs, ys = _series(rows, "epoch", "test/acc")
    if xs:
        ax_acc.axhline(ys[-1], color="tab:red", ls="--", label=f"test accuracy {ys[-1]:.4f}")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    save_figure(fig, out_png)
    return True


def plot_submodels(
    rows: list[dict[str, Any]],
    out_png: str | Path,
    separate: list[dict[str, Any]] | None = None,
    reference: dict[str, float] | None = None,
) -> bool:
    """Plot each submodel's test accuracy against its MACs per example (log scale), one line
    per width, each point labelled with its depth. Returns False when the rows have no costs.

    Args:
        rows: ``{"submodel": "w1/2-d1/3", "width", "accuracy", "macs", ...}`` per submodel
            (``SlimmableTraining``'s test table).
        out_png: where to write the PNG (atomically).
        separate: models trained on their own (``{"macs", "accuracy"}``, optionally
            ``"submodel"``), drawn as black crosses.
        reference: ``{label: accuracy}`` drawn as dashed horizontal lines (blind baselines).
    """
    if not rows or "macs" not in rows[0]:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(6, 4))
    for w in sorted({r["width"] for r in rows}):
        pts = sorted((r["macs"] / 1e6, r["accuracy"], r["submodel"]) for r in rows
                     if r["width"] == w)  # fmt: skip
        label = f"width {pts[0][2].split('-')[0][1:]}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for x, y, name in pts:
            ax.annotate(name.split("-")[1], (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    if separate:
        ax.plot([r["macs"] / 1e6 for r in separate], [r["accuracy"] for r in separate], "kx",
                markersize=8, label="trained on its own")  # fmt: skip
    for (label, value), style in zip((reference or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("MACs per example (millions, log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(
        "submodels of one slimmable model" + (" vs. trained on their own" if separate else "")
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out_png)
    return True


def plot_gates(
    history: list[list[float]], arms: list[str], chosen: list[str], out_png: str | Path
) -> bool:
    """Plot each arm's skipping gate against the gate update (``ArchitectureSkipping``'s
    search), the chosen arms drawn thick. Returns False when the gates never moved."""
    if len(history) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = list(range(len(history)))
    for i, arm in enumerate(arms):
        picked = arm in chosen
        ax.plot(steps, [h[i] for h in history], linewidth=2.5 if picked else 1,
                label=arm + (" (skipped)" if picked else ""))  # fmt: skip
    ax.set_xlabel("gate update")
    ax.set_ylabel("gate (higher: more skippable)")
    ax.set_title("architecture skipping: gate trajectories")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, out_png)
    return True


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
