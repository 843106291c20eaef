"""Cluster-scale runs: the run environment under Slurm / torchrun (:mod:`.environment`),
sweeps submitted through submitit — a Slurm job array, or one point after another on this
machine (:mod:`.sweep`, ``make sweep``) — and their reports (:mod:`.report`, ``make report``).

The sweep and report names are imported lazily, so ``vlcompress.run`` can import
:mod:`vlcompress.cluster.environment` without loading them.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "submit_sweep": "sweep",
    "run_point": "sweep",
    "plan_sweep": "sweep",
    "expand_points": "sweep",
    "load_manifest": "sweep",
    "summarize": "sweep",
    "build_report": "report",
    "write_report": "report",
    "report_table": "report",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
