"""``RunGuard``: what a vlcompress run keeps in every checkpoint and does when it is stopped.

* Every checkpoint carries the resolved configuration (``checkpoint["vlcompress_config"]``),
  so a resumed run can be checked against the run it continues.
* On SIGTERM (``timeout``, Slurm pre-emption, Kubernetes) or SIGINT (Ctrl-C) during training,
  ``checkpoints/last.ckpt`` is saved where the run stopped, and the signal is remembered so the
  run can exit with 143 / 130 and print the exact resume command.

Not Lightning's ``OnExceptionCheckpoint``: with one among the callbacks, ``fit(ckpt_path=None)``
silently resumes from whatever last checkpoint it finds, and its ``teardown`` deletes its file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["RunGuard"]


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
        """Put the resolved configuration into the checkpoint."""
        checkpoint["vlcompress_config"] = self.config
