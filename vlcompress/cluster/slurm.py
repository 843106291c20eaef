"""Slurm through submitit: ``sweep.slurm`` as executor parameters, the executor's choice
(``auto``, ``slurm``, ``local``), the consistency of ``sweep.slurm`` with the trainer, and the
state of a submitted job.

Example:
    >>> time_to_minutes("01:30:00"), slurm_parameters(SlurmConfig(time="90"))["timeout_min"]
    (90, 90)
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from vlcompress.config import ConfigError, ExperimentConfig
from vlcompress.config.schema import SlurmConfig

__all__ = [
    "ACTIVE_SLURM",
    "job_active",
    "make_executor",
    "resolve_executor",
    "slurm_consistency",
    "slurm_parameters",
    "time_to_minutes",
]

log = logging.getLogger(__name__)

ACTIVE_SLURM = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED"}
)
"""Slurm job states of a job that is still queued or running."""


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


def slurm_consistency(cfg: ExperimentConfig) -> list[str]:
    """``sweep.slurm`` against the trainer: nodes, and one task per device.

    Args:
        cfg: a point's full configuration.

    Returns:
        The problems found (empty when consistent).
    """
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


def job_active(log_folder: str | Path, job_id: str) -> bool:
    """Whether a Slurm job is still queued or running (an unknown job, or no ``sacct``: no).

    Args:
        log_folder: submitit's folder of the job.
        job_id: the Slurm job id.

    Returns:
        ``True`` when the job's state is one of :data:`ACTIVE_SLURM`.
    """
    try:
        import submitit

        state = submitit.SlurmJob(folder=str(log_folder), job_id=job_id).state
    except Exception as e:  # no sacct, job unknown to Slurm: treat as gone
        log.warning("cannot read the state of job %s: %s", job_id, e)
        return False
    return state.split()[0].upper() in ACTIVE_SLURM
