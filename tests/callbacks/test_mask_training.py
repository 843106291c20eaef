"""MaskTraining on a tiny BERT: scores from magnitudes, straight-through gradients, exact
per-matrix sparsity at every reset, frozen weights, exact resume, baked masks."""

from __future__ import annotations

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import LightningToy, trainer_kwargs

from vlcompress.callbacks import MagnitudePruning, MaskTraining, masks_in_checkpoint


def _fit(tmp_path, cb, epochs, ckpt=None, save=None):
    model = LightningToy()
    trainer = lp.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs), callbacks=[cb])
    trainer.fit(model, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return model, cb


KW = dict(reset_every=2, score_lr=0.05, make_permanent=False, seed=0)


def test_masks_start_from_magnitudes_and_learn(tmp_path):
    model = LightningToy()
    weights = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    cb = MaskTraining(0.5, **{**KW, "score_lr": 0.0})  # scores do not move: the initial masks
    trainer = lp.Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[cb])
    trainer.fit(model)
    for t in cb.targets:  # the first masks are the magnitude masks
        mask = cb.masks[t.name]
        assert mask.float().mean() == pytest.approx(0.5, abs=1e-3)
        w = weights[t.name].abs()
        assert w[mask].min() >= w[~mask].max()
    model, cb = _fit(tmp_path, MaskTraining(0.5, **KW), 3)
    assert cb.resets == [2, 4, 6, 8]
    for t in cb.targets:  # straight-through gradients moved the scores away from 0 / 2 tau
        assert not torch.allclose(cb.scores[t.name], torch.zeros_like(cb.scores[t.name]), atol=0.03)


def test_each_matrix_holds_exactly_its_target_after_a_reset(tmp_path):
    spars = {"language": 0.7}
    model, cb = _fit(tmp_path, MaskTraining(spars, **KW), 2)
    cb._reset_thresholds(99)
    for t in cb.targets:
        entry = cb.report()["sparsity"]["matrices"][t.name]
        assert entry["actual"] == pytest.approx(entry["target"]), t.name
        assert entry["target"] == pytest.approx(0.7, abs=0.01)


def test_weights_are_frozen_but_the_head_trains(tmp_path):
    model = LightningToy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = MaskTraining(0.5, freeze="all_but_head", **KW)
    lp.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[cb]).fit(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == n.startswith("task_head"), n  # the toy's head is outside the anatomy


def test_resume_continues_exactly(tmp_path):
    full, cb_full = _fit(tmp_path / "a", MaskTraining(0.6, **KW), 3)
    ckpt = tmp_path / "mid.ckpt"
    _fit(tmp_path / "b", MaskTraining(0.6, **KW), 1, save=ckpt)
    res, cb_res = _fit(tmp_path / "b", MaskTraining(0.6, **KW), 3, ckpt=str(ckpt))
    assert cb_res.resets == cb_full.resets
    for n in cb_full.scores:
        assert torch.equal(cb_full.scores[n].detach(), cb_res.scores[n].detach()), n
        assert torch.equal(cb_full.masks[n], cb_res.masks[n])
    for (n, a), b in zip(full.state_dict().items(), res.state_dict().values()):
        assert torch.equal(a, b), n


def test_make_permanent_bakes_the_masks_and_a_later_stage_keeps_them(tmp_path):
    ckpt = tmp_path / "stage2.ckpt"
    model, cb = _fit(
        tmp_path / "a", MaskTraining(0.5, **{**KW, "make_permanent": True}), 1, save=ckpt
    )
    assert cb._forward is None  # hooks removed: the plain model is the sparse one
    final = cb.report()["sparsity"]["overall"]  # a last reset: exactly the target at the end
    assert final["actual"] == pytest.approx(final["target"]) == pytest.approx(0.5, abs=1e-3)
    assert cb.report()["final"]["sparsity_before_final_reset"] < 0.5  # drift since the reset
    x = torch.randint(0, 50, (2, 8))
    for t in cb.targets:
        w = dict(model.model.named_parameters())[t.name]
        assert bool((w[~cb.masks[t.name]] == 0).all())
    assert model.model(input_ids=x).last_hidden_state.isfinite().all()
    masks = masks_in_checkpoint(ckpt)  # stage 3 takes them as fixed masks
    stage3, cb3 = _fit(tmp_path / "b", MagnitudePruning(masks_from=str(ckpt), seed=0), 1)
    assert all(torch.equal(cb3.masks[n].cpu(), masks[n]) for n in masks)


def test_bad_arguments():
    with pytest.raises(ValueError, match="freeze must be one of"):
        MaskTraining(freeze="weights")
    with pytest.raises(ValueError, match="tau"):
        MaskTraining(tau=0.0)
