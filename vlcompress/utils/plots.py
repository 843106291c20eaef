"""Plots: a run's training curves (PNG, from Lightning's ``metrics.csv``) and saving figures."""

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


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it as a PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
