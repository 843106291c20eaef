"""FiniteLossGuard: stops before backward at the first NaN loss, with advice that fits the
project it runs in; registered, zero-argument, checkpointed."""

from __future__ import annotations

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import STEPS_PER_EPOCH, LightningToy, trainer_kwargs

from vlcompress.callbacks import CompressionCallback, FiniteLossGuard, NonFiniteLossError
from vlcompress.registry import get

NAN_STEP = STEPS_PER_EPOCH + 1  # epoch 1, batch 1


def _run_until_nan(tmp_path, guard):
    module = LightningToy(nan_at_step=NAN_STEP)
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=3, enable_checkpointing=True),
        callbacks=[guard, lp.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
    )
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module)
    return str(info.value), module


def test_nan_stops_before_backward_with_plain_lightning_advice(tmp_path):
    guard = FiniteLossGuard()
    msg, module = _run_until_nan(tmp_path, guard)
    assert f"non-finite training loss (nan) at global step {NAN_STEP} (epoch 1, batch 1)" in msg
    assert f"Last good checkpoint: {tmp_path / 'ckpt' / 'last.ckpt'}" in msg
    # Someone else's Lightning project: Lightning terms, none of our config keys.
    assert "Trainer(gradient_clip_val=" in msg and "learning rate" in msg
    assert "optim." not in msg and "grad_clip " not in msg
    # No NaN update was applied, and the guard counted the finite losses before it.
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert guard.checked == NAN_STEP
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS_PER_EPOCH
    assert ckpt["callbacks"]["FiniteLossGuard"]["state"] == {"checked": STEPS_PER_EPOCH}


def test_advice_names_config_keys_inside_a_vlcompress_run(tmp_path):
    guard = FiniteLossGuard()
    guard.within_vlcompress_run = True  # what vlcompress.run sets
    msg, _ = _run_until_nan(tmp_path, guard)
    assert "optim.lr" in msg and "optim.grad_clip" in msg
    assert "Trainer(" not in msg


def test_registered_zero_argument_and_stateful():
    component = get("callback", "finite_loss_guard")
    assert component.builder is FiniteLossGuard
    component.validate({})
    guard = component.build()
    assert isinstance(guard, CompressionCallback) and not guard.requires_anatomy
    with pytest.raises(TypeError, match="unknown option"):
        component.validate({"every_n_steps": 2})

    guard.checked = 5
    fresh = FiniteLossGuard()
    fresh.load_state_dict(guard.state_dict())
    assert fresh.checked == 5
    assert fresh.report() == {"checked_losses": 5}
    assert fresh.report_rows() == [("finite losses checked", "5")]
