"""StagedFreeze: a modality stays exactly fixed until ``until_step`` and trains after it; the
one-process (requires_grad) and DDP (dropped gradients) paths agree; a resumed run matches the
uninterrupted one; requires_grad comes back after fit; registered with a preflight."""

from __future__ import annotations

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import STEPS_PER_EPOCH, LightningToy, trainer_kwargs

from vlcompress.callbacks import StagedFreeze, modality_parameters
from vlcompress.models.anatomy import Modality, anatomy_of
from vlcompress.registry import get

UNTIL = STEPS_PER_EPOCH + 1  # epoch 1, batch 1


class _Snapshots(lp.Callback):
    """The language weights and the head before every optimiser step."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        word = pl_module.model.embeddings.word_embeddings.weight
        self.seen.append(
            (
                trainer.global_step,
                word.detach().clone(),
                pl_module.task_head.weight.detach().clone(),
                word.requires_grad,
            )
        )


def _fit(tmp_path, callbacks, max_epochs=3, ckpt_path=None, module=None, **kw):
    module = module or LightningToy()
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=max_epochs, **kw), callbacks=callbacks
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_language_fixed_until_step_then_trains_and_requires_grad_comes_back(tmp_path):
    snaps = _Snapshots()
    module = _fit(tmp_path, [StagedFreeze(["language"], until_step=UNTIL), snaps])
    steps = [s for s, *_ in snaps.seen]
    assert steps == list(range(3 * STEPS_PER_EPOCH))
    words = [w for _, w, _, _ in snaps.seen]
    heads = [h for _, _, h, _ in snaps.seen]
    for i in range(1, UNTIL + 1):  # every update before until_step left the language alone
        assert torch.equal(words[i], words[0]), i
        assert not torch.equal(heads[i], heads[i - 1]), i
    assert not torch.equal(words[UNTIL + 1], words[UNTIL])  # the first update after it
    assert [g for *_, g in snaps.seen] == [s >= UNTIL for s in steps]
    assert all(p.requires_grad for p in module.parameters())


def test_ddp_path_drops_gradients_with_the_same_result(tmp_path, monkeypatch):
    one = _weights(_fit(tmp_path / "a", [StagedFreeze(["language"], until_step=UNTIL)]))
    monkeypatch.setattr(StagedFreeze, "world_size", property(lambda self: 2))
    snaps = _Snapshots()
    two = _weights(_fit(tmp_path / "b", [StagedFreeze(["language"], until_step=UNTIL), snaps]))
    assert all(g for *_, g in snaps.seen)  # requires_grad untouched: DDP's buckets stay valid
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-6), k


def test_resume_mid_freeze_matches_the_uninterrupted_run(tmp_path):
    straight = _weights(_fit(tmp_path / "s", [StagedFreeze(["language"], until_step=UNTIL)]))
    ckpt = lp.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = StagedFreeze(["language"], until_step=UNTIL)
    _fit(tmp_path / "r", [first, ckpt], max_epochs=1, enable_checkpointing=True)
    assert first.unfrozen_at is None  # stopped while frozen (step 3 < 4)
    second = StagedFreeze(["language"], until_step=UNTIL)
    resumed = _fit(
        tmp_path / "r",
        [second],
        ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
        module=LightningToy(),
    )
    assert second.unfrozen_at == UNTIL
    for k, v in _weights(resumed).items():
        assert torch.allclose(v, straight[k], atol=1e-6), k
    assert second.report() == {
        "modalities": ["language"],
        "until_step": UNTIL,
        "unfrozen_at": UNTIL,
        "frozen_parameters": sum(p.numel() for p in resumed.model.parameters()),
    }


def test_modality_parameters_follow_the_anatomy():
    module = LightningToy()
    anatomy = anatomy_of(module.model)
    language = modality_parameters(module.model, anatomy, [Modality.LANGUAGE])
    assert set(language) == {n for n, _ in module.model.named_parameters()}
    assert modality_parameters(module.model, anatomy, [Modality.VISION]) == {}


def test_registered_checked_and_preflighted():
    component = get("callback", "staged_freeze")
    assert component.builder is StagedFreeze
    component.validate({"modalities": ["language", "vision"], "until_step": 10})
    with pytest.raises(ValueError, match="until_step must be in"):
        StagedFreeze(["language"], until_step=0)
    with pytest.raises(ValueError, match="modalities must be one of"):
        StagedFreeze(["audio"])
    with pytest.raises(ValueError, match="non-empty list"):
        StagedFreeze("language")
    problems = StagedFreeze(["vision"]).preflight(LightningToy().model)
    assert any("declares no parameters of vision" in p for p in problems)
