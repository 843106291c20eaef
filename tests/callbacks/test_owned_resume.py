"""The base's way of changing training (owned modules attached through the anatomy, a captured
hidden state, a wrapped training step with an extra loss): undone after fit, and a run killed
mid-way and resumed ends bit-identical to an uninterrupted one — under both Lightning packages,
with 1 and 2 processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import AdapterDistiller, LightningToy, trainer_kwargs

RUN = Path(__file__).with_name("owned_resume_run.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(package: str, devices: int, out: Path, phase: str) -> subprocess.Popen:
    """One phase in its own process, on its own port (two DDP phases run side by side)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0", "MASTER_PORT": str(_free_port())}
    return subprocess.Popen(
        [sys.executable, str(RUN), package, str(devices), str(out), phase],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def _same(a, b, path="") -> list[str]:
    """Where two nested states differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        return [] if isinstance(b, torch.Tensor) and torch.equal(a, b) else [path]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [path + " (keys)"]
        return [d for k in a for d in _same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [path + " (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


@pytest.mark.parametrize("devices", [1, 2])
@pytest.mark.parametrize("package", ["lightning.pytorch", "pytorch_lightning"])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, package, devices):
    pytest.importorskip(package)
    full = _start(package, devices, tmp_path / "full", "full")  # both at once: 2 cores
    killed = _start(package, devices, tmp_path / "kr", "killed")
    code, err = _wait(full)
    assert code == 0, err[-3000:]
    code, err = _wait(killed)
    assert code != 0  # SIGKILL at step 4: nothing after it ran
    steps_per_epoch = 3 // devices + (3 % devices > 0)  # 12 examples, batch 4, per rank
    saved = tmp_path / "kr" / "ckpt" / f"epoch=0-step={steps_per_epoch}.ckpt"
    assert saved.is_file(), err[-3000:]
    assert not list((tmp_path / "kr").glob("killed_rank*.pt"))
    code, err = _wait(_start(package, devices, tmp_path / "kr", "resume"))
    assert code == 0, err[-3000:]

    for rank in range(devices):
        a = torch.load(tmp_path / "full" / f"full_rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "kr" / f"resume_rank{rank}.pt", weights_only=True)
        assert a["step"] == b["step"] == 3 * steps_per_epoch
        assert _same(a["model"], b["model"]) == []
        owned = a["callback"]["owned"]
        assert set(owned["modules"]) == {
            "adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias",
            "projection.weight", "projection.bias",
        }  # fmt: skip
        assert owned["optimizer"]["state"]  # the owned Adam did step
        assert _same(a["callback"], b["callback"]) == []  # owned weights, Adam state, losses
        assert len(a["callback"]["state"]["extra_losses"]) == 3 * steps_per_epoch
        # after teardown the module is what it was: no hook, no instance attribute
        assert (a["hooks"], a["instance"], b["hooks"], b["instance"]) == (0, [], 0, [])
    if devices == 2:  # every rank holds the same model and owned weights
        r0, r1 = (torch.load(tmp_path / "full" / f"full_rank{r}.pt", weights_only=True)
                  for r in range(2))  # fmt: skip
        assert _same(r0["model"], r1["model"]) == []
        assert _same(r0["callback"]["owned"], r1["callback"]["owned"]) == []


def test_effects_are_on_during_fit_and_gone_after(tmp_path):
    task = LightningToy()
    keys = list(task.state_dict())
    cls_step = type(task).training_step
    ids = task.data.tensors[0][:2]
    with torch.no_grad():
        plain = task.model(input_ids=ids).last_hidden_state
    seen: dict[str, object] = {}

    class Probe(lp.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                cb = trainer.callbacks[0]
                seen["effects"] = cb.effects.describe()
                seen["wrapped"] = "training_step" in vars(pl_module)
                with torch.no_grad():
                    seen["out"] = pl_module.model(input_ids=ids).last_hidden_state

    cb = AdapterDistiller()
    trainer = lp.Trainer(**trainer_kwargs(tmp_path, max_steps=2), callbacks=[cb, Probe()])
    trainer.fit(task)

    assert seen["effects"] == [
        "Adapter attached at encoder.layer.0",
        "capture of ['encoder.layer.1']",
        "training_step wrapper",
    ]
    assert seen["wrapped"] is True
    assert not torch.allclose(seen["out"], plain)  # the adapter changed the forward
    # after fit: the same keys, no hooks, the class's training_step, no owned parameters
    assert list(task.state_dict()) == keys
    assert all(not m._forward_hooks for m in task.modules())
    assert "training_step" not in vars(task) and type(task).training_step is cls_step
    assert len(cb.effects) == 0
    assert not any(n.startswith("adapter") for n, _ in task.named_parameters())
    assert len(cb.extra_losses) == 2
    last = cb.hidden["encoder.layer.1"]
    with torch.no_grad():
        task.model(input_ids=ids)
    assert cb.hidden["encoder.layer.1"] is last  # the capture is gone too


def test_two_callbacks_wrap_one_step_and_leave_in_any_order(tmp_path):
    from vlcompress.callbacks.effects import wrap_training_step

    task = LightningToy()
    calls: list[str] = []

    def outer(step, *a, **k):
        calls.append("outer")
        return step(*a, **k)

    def inner(step, *a, **k):
        calls.append("inner")
        return step(*a, **k)

    a, b = object(), object()
    remove_a = wrap_training_step(task, a, outer)
    remove_b = wrap_training_step(task, b, inner)
    batch = next(iter(task.train_dataloader()))
    task.training_step(batch, 0)
    assert calls == ["outer", "inner"]
    remove_a()  # the first one out first: the second still wraps
    calls.clear()
    task.training_step(batch, 0)
    assert calls == ["inner"]
    remove_b()
    assert "training_step" not in vars(task)
