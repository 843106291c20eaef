"""Run folders that lose nothing: refused reuse, locks, stale files, checked resumes, signals,
clear errors — on real easy-VQA runs of a few batches."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from vlcompress import registry
from vlcompress.config import ConfigError, load_experiment
from vlcompress.run import RunInterrupted, run_experiment
from vlcompress.utils.run_folder import RunFolder


@pytest.fixture
def tiny(tiny_run):
    def make(out, *extra):
        return load_experiment("default", [*tiny_run, f"output_dir={out}", *extra])

    return make


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_a_used_folder_is_refused_and_overwrite_keeps_the_old_run(tmp_path, tiny):
    out = tmp_path / "run"
    run_experiment(*tiny(out, "trainer.max_epochs=1"))
    with pytest.raises(ConfigError, match=r"already holds a run .*resume=true.*overwrite=true"):
        run_experiment(*tiny(out, "trainer.max_epochs=1"))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"  # untouched
    run_experiment(*tiny(out, "trainer.max_epochs=1", "overwrite=true"))
    (old,) = tmp_path.glob("run.replaced-*")
    assert (old / "results.json").is_file() and (out / "results.json").is_file()


def test_a_locked_folder_is_refused(tmp_path, tiny):
    holder = RunFolder(tmp_path / "run")
    holder.claim(resume=False)
    try:
        with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()} on "):
            run_experiment(*tiny(tmp_path / "run", "resume=false"))
    finally:
        holder.release()


def test_resume_checks_the_config_first_and_cleans_stale_files(tmp_path, tiny):
    out = tmp_path / "run"
    run_experiment(*tiny(out, "trainer.max_epochs=1"))
    config, metrics = (out / "config.yaml").read_bytes(), (out / "metrics.csv").read_bytes()
    with pytest.raises(ConfigError) as e:
        run_experiment(*tiny(out, "trainer.max_epochs=2", "resume=true", "optim.lr=0.5"))
    assert "resume: optim.lr: 0.001 -> 0.5 (the checkpoint's run has the first value)" in str(
        e.value
    )
    # Nothing was written: the folder still describes the run in the checkpoint.
    assert (out / "config.yaml").read_bytes() == config
    assert (out / "metrics.csv").read_bytes() == metrics
    stale = out / "checkpoints" / ".last.ckpt.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    run_experiment(*tiny(out, "trainer.max_epochs=2", "resume=true"))  # max_epochs may change
    assert not stale.exists()
    assert len(list(out.glob("config*.yaml"))) == 2  # the earlier config is kept beside


def test_a_damaged_checkpoint_and_a_bad_folder_give_one_clear_error(tmp_path, tiny):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read the checkpoint .*last.ckpt .*damaged"):
        run_experiment(*tiny(out, "resume=true"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"cannot write the run folder .*a-file/run"):
        run_experiment(*tiny(blocker / "run"))


class SigtermAt(Callback):
    """Sends this process SIGTERM after training step ``at`` (as ``timeout`` or Slurm would)."""

    def __init__(self, at: int = -1) -> None:
        self.at = at

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def sigterm_callback():
    with registry.isolated():
        registry.register("callback", "sigterm_at")(SigtermAt)
        yield


def test_sigterm_saves_and_the_resumed_run_continues_exactly(tmp_path, tiny, sigterm_callback):
    cb = "callbacks=[{name: finite_loss_guard}, {name: sigterm_at, options: {at: 8}}]"
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_experiment(*tiny(straight, "trainer.max_epochs=2"))
    with pytest.raises(RunInterrupted) as e:  # step 8 = epoch 1, batch 2: mid-epoch
        run_experiment(*tiny(cut, "trainer.max_epochs=2", cb), overrides=[cb])
    assert e.value.exit_code == 143
    text = str(e.value)
    assert "interrupted by SIGTERM at epoch 1, global step 8" in text
    assert f"resume=true output_dir={cut}" in text
    assert json.loads((cut / "run.json").read_text())["status"] == "interrupted"
    ckpt = torch.load(cut / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8
    run_experiment(*tiny(cut, "trainer.max_epochs=2", cb, "resume=true"))
    a, b = _weights(straight / "checkpoints/last.ckpt"), _weights(cut / "checkpoints/last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [r for r in csv.DictReader((cut / "metrics.csv").open()) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)  # the history, once
    assert json.loads((cut / "run.json").read_text())["status"] == "finished"


def test_the_cli_exits_143_on_sigterm_and_prints_the_resume_command(tmp_path, tiny_run):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlcompress", "train", "default", *tiny_run,
           "trainer.max_epochs=500", f"output_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 240
        while not (out / "checkpoints" / "last.ckpt").is_file():  # training has begun
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "stopped: interrupted by SIGTERM at epoch" in err
    assert "resume exactly with:\n  python -m vlcompress train default" in err
    assert f"resume=true output_dir={out}" in err


def _attempt(folder, status, **info):
    """A run folder whose ``run.json`` records ``status`` and no checkpoint."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("name: x\n")
    record = {"status": status, "history": [{"status": status, "pid": info.pop("pid", 1)}]}
    (folder / "run.json").write_text(json.dumps({**record, **info}))
    return RunFolder(folder)


def test_only_an_attempt_that_surely_ended_before_a_checkpoint_is_moved_aside(tmp_path):
    import socket

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, here = int(gone.stdout), socket.gethostname()
    ended = {
        "failed": _attempt(tmp_path / "failed", "failed", error="ValueError: x"),
        "interrupted": _attempt(tmp_path / "interrupted", "interrupted"),
        "died here": _attempt(tmp_path / "died", "running", host=here, pid=dead_pid),
    }
    for what, folder in ended.items():
        assert folder.unfinished_attempt() is not None, what
        folder.claim(resume=False)  # moved aside, the folder is this run's
        folder.release()
        assert list(tmp_path.glob(f"{folder.path.name}.failed-*")), what
    maybe_alive = {
        "running elsewhere": _attempt(tmp_path / "elsewhere", "running", host="node-b"),
        "running here": _attempt(tmp_path / "alive", "running", host=here, pid=os.getppid()),
        "finished": _attempt(tmp_path / "finished", "finished"),
    }
    with_checkpoint = _attempt(tmp_path / "saved", "failed")
    (with_checkpoint.path / "checkpoints").mkdir()
    (with_checkpoint.path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    maybe_alive["a checkpoint to resume"] = with_checkpoint
    locked = _attempt(tmp_path / "locked", "failed")
    holder = RunFolder(locked.path)
    holder._lock()  # a live process (here: this one, through another descriptor) holds it
    maybe_alive["locked"] = locked
    for what, folder in maybe_alive.items():
        assert folder.unfinished_attempt() is None, what
    with pytest.raises(Exception, match="already holds a run"):
        maybe_alive["running elsewhere"].claim(resume=False)
    holder.release()
    assert not list(tmp_path.glob("elsewhere.failed-*"))
