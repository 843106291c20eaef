"""``HistoryCSVLogger``: Lightning's CSV logger, but ``metrics.csv`` survives resumes.

Lightning's CSV logger deletes an existing ``metrics.csv`` when a run folder is reused, so a
resumed run that is killed or fails loses the earlier epochs' history for good. Here the file
is only ever appended to. When a run resumes from a checkpoint at global step ``s``, the rows
the earlier process logged at steps ``>= s`` (after that checkpoint, before it died) are about
to be logged again; they are moved to ``metrics.superseded.csv`` (kept, not deleted), so
``metrics.csv`` holds each step once.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from vlcompress.utils.io import atomic_write_text

log = logging.getLogger(__name__)

__all__ = ["HistoryCSVLogger"]

SUPERSEDED = "metrics.superseded.csv"


def _read(path: str) -> tuple[list[str], list[dict[str, str]]]:
    if not os.path.isfile(path):
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _csv(fields: list[str], rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self._resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Keep the earlier rows; move the ones a resumed run will log again aside."""
        fields, rows = _read(self.metrics_file_path)
        if not rows:
            return
        if self._resume_step is not None:
            keep = [r for r in rows if not _step(r) >= self._resume_step]
            later = [r for r in rows if _step(r) >= self._resume_step]
            if later:
                old_fields, old = _read(os.path.join(self.log_dir, SUPERSEDED))
                all_fields = sorted(set(old_fields) | set(fields))
                atomic_write_text(
                    os.path.join(self.log_dir, SUPERSEDED), _csv(all_fields, old + later)
                )
                log.info(
                    "%d metrics row(s) logged after the resumed checkpoint (step >= %d) moved "
                    "to %s", len(later), self._resume_step, SUPERSEDED,
                )  # fmt: skip
                atomic_write_text(self.metrics_file_path, _csv(fields, keep))
        self.metrics_keys = sorted(fields)


class HistoryCSVLogger(CSVLogger):
    """CSV logger writing ``<save_dir>/metrics.csv`` without ever deleting earlier rows.

    Args:
        save_dir: the run folder.
        resume_step: global step of the checkpoint a resumed run starts from (``None`` for a
            fresh run).
    """

    def __init__(self, save_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        super().__init__(save_dir, name="", version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        """The writer (created on first use, on rank 0 only)."""
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(self.log_dir, self._resume_step)
        return self._experiment
