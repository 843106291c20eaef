"""The run folder's safety rules: one run at a time, never over another run, nothing lost.

* a folder that already holds a run is refused unless the run is resumed (``resume=true``) or
  the old run is moved aside (``overwrite=true``: it becomes ``<folder>.replaced-<time>``,
  never deleted); a run that ended before its first checkpoint holds nothing to resume, so it
  is moved aside by itself (``<folder>.failed-<time>``) and the folder is used again;
* a lock (``fcntl.flock`` on ``.lock``, released by the kernel when the process dies) refuses
  a second concurrent run naming the process that holds it;
* temporary files of killed atomic writes are removed;
* ``run.json`` records the run's status (``running``, ``finished``, ``failed``,
  ``interrupted``), so a half-made folder never looks like a finished run;
* a resumed run's configuration is compared with the checkpoint's before anything is written.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from vlcompress.utils.io import atomic_write_json
from vlcompress.utils.mappings import flatten

log = logging.getLogger(__name__)

__all__ = ["RESUMABLE_KEYS", "RunFolder", "RunFolderError", "config_changes"]

RESUMABLE_KEYS: tuple[str, ...] = (
    "resume",
    "overwrite",
    "output_dir",
    "progress_bar",
    "threads",
    "description",
    "sweep",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.limit_test_batches",
    "data.options.num_workers",
    "data.options.eval_batch_size",
    "data.options.cache_dir",
    "data.options.data_dir",
)
"""Configuration keys (and their sub-keys) that may differ when a run is resumed; any other
difference would make the resumed run a different experiment and is refused."""

_OWN_FILES = {".lock"}

_ENDED = {"failed": "failed", "interrupted": "was interrupted"}
"""Statuses a run records when it ends early, and how a sentence says it."""


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked; the message names the folder and the fix."""


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Differences between two resolved configurations outside :data:`RESUMABLE_KEYS`, as
    ``"key: <old> -> <new>"`` lines."""
    a, b = flatten(old), flatten(new)

    def allowed(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUMABLE_KEYS)

    return [
        f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
        for k in sorted(set(a) | set(b))
        if not allowed(k) and a.get(k) != b.get(k)
    ]


class RunFolder:
    """A run folder and its rules (see the module docstring). Only rank 0 creates one.

    Args:
        path: the folder.

    Example::

        folder = RunFolder(Path("runs/default/x"))
        folder.claim(resume=False, overwrite=False)   # refuse / move aside, lock, clean
        folder.set_status("running")
        ...
        folder.set_status("finished")
        folder.release()
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        self._info: dict[str, Any] = {}

    # ------------------------------------------------------------------ claiming
    def holds_a_run(self) -> bool:
        """True when the folder has anything in it besides our lock file."""
        return self.path.is_dir() and any(p.name not in _OWN_FILES for p in self.path.iterdir())

    def claim(self, resume: bool, overwrite: bool = False) -> None:
        """Make the folder this run's: refuse or move aside another run, lock, clean.

        Raises:
            RunFolderError: the folder holds a run (without ``resume``/``overwrite``), another
                process is running in it, or it cannot be created or written.
        """
        if not resume and self.holds_a_run():
            attempt = self.unfinished_attempt()
            if attempt is not None and not overwrite:
                target = self._move_aside("failed")
                log.warning(
                    "%s held a run that %s before its first checkpoint (%s); nothing there can "
                    "be resumed, so it was moved to %s and this run starts afresh",
                    self.path, attempt["ended"], attempt["error"] or "no error recorded", target,
                )  # fmt: skip
            elif not overwrite:
                raise RunFolderError(
                    f"run folder {self.path} already holds a run "
                    f"({', '.join(sorted(p.name for p in self.path.iterdir() if p.name not in _OWN_FILES)[:6])}); continue "
                    f"it with resume=true, choose another output_dir=, or give overwrite=true "
                    f"(the old run is kept as {self.path.name}.replaced-<time>, nothing is deleted)"
                )
            else:
                self._move_aside("replaced")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock()
        except OSError as e:  # permissions, a file in the way, a read-only disk
            raise RunFolderError(
                f"cannot write the run folder {self.path}: {e.strerror or e}; choose a writable "
                "output_dir="
            ) from e
        self.clean_temp_files()

    def unfinished_attempt(self) -> dict[str, str] | None:
        """``{"status", "ended", "error"}`` when the folder holds a vlcompress run
        (``run.json``) that ended before saving any checkpoint, so nothing in it can be
        resumed: it failed or was interrupted, or it was running on this host and its process
        is gone. ``None`` otherwise: no run, a checkpoint to resume, or a run that may be
        alive (a lock held, or ``running`` on another host, whose process cannot be seen)."""
        if not self.path.is_dir() or any(self.path.rglob("*.ckpt")):
            return None
        try:
            info = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError):
            return None
        status = str(info.get("status") or "")
        if status not in _ENDED and not (status == "running" and self._died_here(info)):
            return None
        if self._locked_by_another():
            return None
        ended = _ENDED.get(status, "stopped (its process is gone)")
        return {"status": status, "ended": ended, "error": str(info.get("error", ""))}

    @staticmethod
    def _died_here(info: dict[str, Any]) -> bool:
        """True when ``run.json`` says the run ran on this host in a process that is gone."""
        history = info.get("history") or [{}]
        pid = history[-1].get("pid")
        if info.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, owned by someone else
            return False
        return pid == os.getpid()  # this process: its earlier run here has ended

    def _locked_by_another(self) -> bool:
        """True when a live process holds the folder's lock (or the lock cannot be tested:
        then the folder is treated as in use)."""
        lock = self.path / ".lock"
        if not lock.is_file():
            return False
        try:  # opened for writing: NFS emulates flock with byte-range locks, which need it
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held; anything else: cannot tell, so assume held
            return True
        finally:
            os.close(fd)  # closing the descriptor releases a lock it took
        return False

    def _move_aside(self, why: str) -> Path:
        """Rename the folder to ``<folder>.<why>-<time>`` (history is kept, never deleted)."""
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        target = self.path.with_name(f"{self.path.name}.{why}-{stamp}")
        n = 1
        while target.exists():  # two moves within one second
            target, n = self.path.with_name(f"{self.path.name}.{why}-{stamp}-{n}"), n + 1
        self.path.rename(target)
        if why == "replaced":
            log.warning("overwrite=true: the earlier run in %s was moved to %s", self.path, target)
        return target

    def _lock(self) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"run folder {self.path} is in use by {holder}; wait for that run to end, or "
                "choose another output_dir="
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n".encode())
        self._lock_fd = fd

    def release(self) -> None:
        """Give up the lock (the kernel also releases it if the process dies)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def clean_temp_files(self) -> int:
        """Remove the temporary files that killed atomic writes left (``.<name>.*.tmp``)."""
        stale = [p for p in self.path.rglob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d stale temporary file(s) in %s", len(stale), self.path)
        return len(stale)

    # ------------------------------------------------------------------ status
    def set_status(self, status: str, **fields: Any) -> None:
        """Record the run's status in ``run.json`` (atomically), keeping earlier fields."""
        if not self._info and (self.path / "run.json").is_file():
            try:
                self._info = json.loads((self.path / "run.json").read_text())
            except (OSError, ValueError):
                self._info = {}
        history = self._info.setdefault("history", [])
        history.append({"status": status, "time": _now(), "pid": os.getpid()})
        self._info.update(status=status, updated=_now(), host=socket.gethostname(), **fields)
        atomic_write_json(self.path / "run.json", self._info)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
