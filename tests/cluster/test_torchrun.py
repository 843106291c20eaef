"""torchrun where there is no Slurm: two "nodes" (node ranks 0 and 1, one process each) on
127.0.0.1 train as one 2-process DDP job and equal the single-process run."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from cluster_helpers import (
    DDP_2X1,
    PER_RANK_OF_2,
    PYTHON,
    REPO,
    RUN_TIMEOUT,
    assert_same_run,
    free_port,
)

pytestmark = pytest.mark.cluster


def test_two_node_torchrun_on_loopback_equals_one_process(reference_run, tmp_path):
    out, port = tmp_path / "ddp", free_port()
    # No Slurm variables: Lightning must take the ranks from torchrun, not from an allocation.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    logs, procs = [], []
    for node_rank in (0, 1):
        log = (tmp_path / f"node{node_rank}.log").open("w")
        cmd = [
            PYTHON, "-m", "torch.distributed.run",
            "--nnodes=2", f"--node-rank={node_rank}", "--nproc-per-node=1",
            "--master-addr=127.0.0.1", f"--master-port={port}",
            "-m", "vlcompress", "train", "default", *PER_RANK_OF_2, *DDP_2X1,
            f"output_dir={out}",
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    end, timed_out = time.time() + RUN_TIMEOUT, False
    try:
        for p in procs:
            p.wait(timeout=max(1.0, end - time.time()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:  # a hang (a peer that never came) fails here instead of blocking
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    text = "\n".join(
        f"--- node {i} (exit {p.returncode}):\n" + (tmp_path / f"node{i}.log").read_text()[-4000:]
        for i, p in enumerate(procs)
    )
    assert not timed_out, f"torchrun did not finish within {RUN_TIMEOUT}s:\n{text}"
    assert [p.returncode for p in procs] == [0, 0], text
    assert (out / "results.json").is_file(), text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "node0.log", "node1.log"]
    assert_same_run(out, reference_run)
