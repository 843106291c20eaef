"""Where a run is launched: Slurm (``srun``), ``torchrun``, Lightning's own process launcher or
a single process — and what follows from it for a run (devices, nodes, rank, run folder).

Lightning's cluster environments do the process-group work; this module only reads the same
environment variables to pick ``trainer.devices`` / ``trainer.num_nodes`` when they are left at
``auto`` and to give every rank of one launch the same run folder name.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["RUN_DIR_ENV", "global_rank", "launch_folder_name", "resolve_devices"]

RUN_DIR_ENV = "VLCOMPRESS_RUN_DIR"
"""Set by rank 0 to the run folder it chose; processes Lightning launches inherit it."""


def global_rank() -> int:
    """This process's global rank as the launcher set it (0 when launched alone)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(key)
        if value is not None and value.isdigit():
            if key == "SLURM_PROCID" and not _slurm_launch():
                continue
            return int(value)
    return 0


def _slurm_launch() -> bool:
    """True inside an ``srun``/``sbatch`` job step that Lightning will treat as the launcher."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def _torchrun_launch() -> bool:
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    return TorchElasticEnvironment.detect()


def resolve_devices(devices: Any, num_nodes: Any) -> tuple[Any, int]:
    """``trainer.devices`` and ``trainer.num_nodes``, with ``auto`` taken from the launcher.

    Under Slurm: tasks per node (``SLURM_NTASKS_PER_NODE``, else ``SLURM_NTASKS`` / nodes) and
    ``SLURM_NNODES``; under torchrun: ``LOCAL_WORLD_SIZE`` and ``WORLD_SIZE / LOCAL_WORLD_SIZE``.
    Elsewhere ``devices`` stays ``auto`` (Lightning decides) and ``num_nodes`` is 1.

    Raises:
        ValueError: an explicit setting that contradicts the launcher (Lightning would refuse
            later with a less helpful message).
    """
    env_devices: int | None = None
    env_nodes: int | None = None
    if _slurm_launch():
        env_nodes = int(os.environ.get("SLURM_NNODES", os.environ.get("SLURM_JOB_NUM_NODES", 1)))
        per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        if per_node.isdigit():
            env_devices = int(per_node)
        else:
            env_devices = max(1, int(os.environ.get("SLURM_NTASKS", 1)) // max(1, env_nodes))
        where = "Slurm"
    elif _torchrun_launch():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        env_devices, env_nodes = local, max(1, int(os.environ.get("WORLD_SIZE", 1)) // local)
        where = "torchrun"
    if devices == "auto" and env_devices is not None:
        devices = env_devices
    if num_nodes == "auto":
        num_nodes = env_nodes or 1
    if env_devices is not None:
        total = int(devices) * int(num_nodes) if str(devices).isdigit() else None
        if total is not None and total != env_devices * env_nodes:
            raise ValueError(
                f"trainer.devices={devices} x trainer.num_nodes={num_nodes} = {total} processes, "
                f"but {where} started {env_devices * env_nodes} ({env_devices} per node on "
                f"{env_nodes} node(s)); leave both at 'auto' to follow {where}."
            )
    return devices, int(num_nodes)


def launch_folder_name() -> str | None:
    """A run folder name every rank of one launch agrees on without talking to each other:
    ``slurm-<job id>`` (``<array job>_<task>`` for arrays; the same after a requeue), or
    ``torchrun-<run id>``; ``None`` when the launch has no such id."""
    if _slurm_launch():
        array = os.environ.get("SLURM_ARRAY_JOB_ID")
        if array:
            return f"slurm-{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
        job = os.environ.get("SLURM_JOB_ID")
        return f"slurm-{job}" if job else None
    if _torchrun_launch():
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        return f"torchrun-{run_id}" if run_id and run_id != "none" else None
    return None
