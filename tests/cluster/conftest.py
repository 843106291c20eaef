"""Fixtures of the distributed tests (marker ``cluster``; ``make test-cluster``).

``slurm``: a real single-host Slurm cluster (two emulated nodes, n1 and n2) — the one already
up, or one brought up by ``cluster/slurm_up.sh`` for this session and stopped at its end
(root only; the tests that need it are skipped with the reason otherwise). ``reference_run``:
the single-process run that the 2-node runs (srun, torchrun) must reproduce.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cluster_helpers import DOWN, SINGLE, UP, run, slurm_answers, train


@pytest.fixture(scope="session")
def slurm():
    """A Slurm cluster with nodes n1 and n2 (brought up for the session when none is)."""
    if slurm_answers():
        yield
        return
    if os.geteuid() != 0:
        pytest.skip(
            "no Slurm test cluster is up and bringing one up needs root "
            "(cluster/slurm_up.sh; `make test-cluster` as root)"
        )
    t0 = time.time()
    p = run([str(UP)], timeout=900)
    assert p.returncode == 0, f"cluster/slurm_up.sh failed:\n{p.stdout}\n{p.stderr}"
    print(f"\n{p.stdout.strip()} ({time.time() - t0:.1f}s)")
    try:
        yield
    finally:
        run([str(DOWN)], timeout=120)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The single-process run (batch 32) that the 2 x 1-process runs (batch 16 each) reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out, *SINGLE)
    return out
