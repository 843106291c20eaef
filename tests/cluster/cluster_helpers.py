"""Helpers of the distributed tests (marker ``cluster``; ``make test-cluster``).

The overrides of the tiny runs, running ``python -m vlcompress train`` with a timeout, and the
comparison of a 2-process run with the single-process one.

Every distributed command runs in a subprocess bounded by a timeout, so a hang (a rank
waiting for a peer that never comes) fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
UP, DOWN = REPO / "cluster" / "slurm_up.sh", REPO / "cluster" / "slurm_down.sh"


def broken_easy_vqa(folder: Path) -> Path:
    """An easy-VQA data folder with every expected file but no images: it passes every check
    made before a run (they look for the files) and fails when the data is read."""
    for part in ("train", "test"):
        (folder / part / "images").mkdir(parents=True, exist_ok=True)
        (folder / part / "questions.json").write_text("not json")
    (folder / "answers.txt").write_text("yes\nno\n")
    return folder


# A tiny MCAN; dropout off so that 2 ranks x 16 examples and 1 process x 32 examples take the
# same steps (dropout draws differ between the two layouts; BatchNorm statistics still do).
TINY = [
    "model.name=mcan_tiny",
    "model.options={visual_input: grid, grid_channels: [8, 8, 16, 16], grid_cells: 16, dropout: 0.0}",
    "progress_bar=false",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=2",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "scheduler.name=none",
]
# The same examples per step and per evaluation in both layouts: batch sizes are per process,
# the training shards interleave one permutation, the evaluation shards interleave in order.
# The whole test set (9,673 questions) is evaluated: each must be counted exactly once.
SINGLE = [*TINY, "data.options.batch_size=32", "data.options.eval_batch_size=256"]
PER_RANK_OF_2 = [*TINY, "data.options.batch_size=16", "data.options.eval_batch_size=128"]
DDP_2X1 = ["trainer.num_nodes=2", "trainer.devices=1", "trainer.strategy=ddp"]

RUN_TIMEOUT = 300  # seconds for one training run (single process or distributed)


def run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """``subprocess.run`` with output captured; a timeout fails the test with the output so far."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else e.stderr or ""
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")


def train(out: Path, *overrides: str, timeout: float = RUN_TIMEOUT) -> dict:
    """``python -m vlcompress train default ...`` in one process; returns ``results.json``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    p = run(
        [PYTHON, "-m", "vlcompress", "train", "default", *overrides, f"output_dir={out}"],
        timeout,
        cwd=REPO,
        env=env,
    )
    assert p.returncode == 0, (
        f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    )
    return json.loads((out / "results.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        p = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10
        )
    except subprocess.TimeoutExpired:
        return False
    states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
    return p.returncode == 0 and {"n1", "n2"} <= set(states)


def flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (``pytest.approx`` compares flat mappings only)."""
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def assert_same_run(ddp: Path, single: Path) -> None:
    """The 2-process run's test metrics equal the single-process run's, with every test question
    counted exactly once (no padding of the evaluation shards), after the same number of steps.

    (The weights are close but not equal: the grid stem's BatchNorm normalises each rank's 16
    examples on its own — SyncBatchNorm has no CPU implementation — where the single process
    normalises all 32; evaluation uses the running statistics.)
    """
    a = json.loads((single / "results.json").read_text())
    b = json.loads((ddp / "results.json").read_text())
    for who, r in (("1 process ", a), ("2 processes", b)):
        t = r["test"]
        print(f"{who}: test accuracy {t['accuracy']:.6f} over {t['questions']} questions; "
              f"{' '.join(f'{k} {v:.6f}' for k, v in sorted(t['answer_type'].items()))}; "
              f"best val {r['best_val_accuracy']:.6f}; steps {r['global_steps']}")  # fmt: skip
    n_test = a["data"].get("test")
    assert a["test"]["questions"] == n_test == 9673, (a["test"]["questions"], n_test)
    assert b["test"]["questions"] == a["test"]["questions"], (
        f"the 2-process run counted {b['test']['questions']} test questions, not {n_test}"
    )
    assert b["global_steps"] == a["global_steps"] == 12
    assert flat(b["test"]) == pytest.approx(flat(a["test"]), abs=1e-6)
    assert b["best_val_accuracy"] == pytest.approx(a["best_val_accuracy"], abs=1e-6)
