"""``RunGuard``: what a vlcompress run keeps in every checkpoint and does when it is stopped.

* Every checkpoint carries the resolved configuration (``checkpoint["vlcompress_config"]``),
  so a resumed run can be checked against the run it continues, and the fit wall time spent
  so far, so a resumed run reports the whole run's time (:attr:`RunGuard.train_time_s`).
* On SIGTERM (``timeout``, Slurm pre-emption, Kubernetes) or SIGINT (Ctrl-C) during training,
  ``checkpoints/last.ckpt`` is saved where the run stopped, and the signal is remembered so the
  run can exit with 143 / 130 and print the exact resume command.

Not Lightning's ``OnExceptionCheckpoint``: with one among the callbacks, ``fit(ckpt_path=None)``
silently resumes from whatever last checkpoint it finds, and its ``teardown`` deletes its file.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["RunGuard"]

_TIME_KEY = "vlcompress_train_time_s"


class RunGuard(Callback):
    """Saves ``last.ckpt`` when training is interrupted by a signal; stores the config.

    Args:
        dirpath: the run's checkpoint folder.
        config: the resolved configuration (plain types), stored in every checkpoint.
    """

    def __init__(self, dirpath: str, config: dict[str, Any]) -> None:
        self.ckpt_path = str(Path(dirpath) / "last.ckpt")
        self.config = config
        self.interrupted: str | None = None
        self._earlier_s = 0.0  # fit time of the launches before this one (from the checkpoint)
        self._fit_start: float | None = None

    @property
    def train_time_s(self) -> float:
        """Fit wall time over every launch of the run: what the checkpoint resumed from had
        spent (up to its save), plus this launch's fit (so far, or until it ended)."""
        now = 0.0 if self._fit_start is None else time.monotonic() - self._fit_start
        return self._earlier_s + now

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Start this launch's fit clock."""
        self._fit_start = time.monotonic()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Stop the clock: testing afterwards is not fit time."""
        self._earlier_s, self._fit_start = self.train_time_s, None

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Take the fit time the resumed checkpoint had spent; this launch adds its own."""
        if trainer.state.fn != TrainerFn.FITTING:  # a test loading the best weights
            return
        self._earlier_s = float(checkpoint.get(_TIME_KEY, 0.0))
        self._fit_start = time.monotonic()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Remember the signal; save the checkpoint if training was running."""
        if isinstance(exception, SIGTERMException):
            self.interrupted = "SIGTERM"
        elif isinstance(exception, KeyboardInterrupt):
            self.interrupted = "SIGINT"
        else:
            return  # other failures keep the last good checkpoint as it is
        if trainer.state.fn == TrainerFn.FITTING:
            trainer.save_checkpoint(self.ckpt_path)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Put the resolved configuration and the fit time so far into the checkpoint."""
        checkpoint["vlcompress_config"] = self.config
        checkpoint[_TIME_KEY] = self.train_time_s
