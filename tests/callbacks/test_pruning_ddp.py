"""Two real DDP processes (gloo on CPU): pruning masks and mask scores agree on both ranks."""

from __future__ import annotations

import json

import lightning.pytorch as lp
from callback_toys import LightningToy, MaskRecorder, trainer_kwargs

from vlcompress.callbacks import MagnitudePruning, MaskTraining


def test_masks_and_scores_are_identical_on_both_ranks(tmp_path):
    callbacks = [
        MagnitudePruning(0.5, schedule="linear", start_step=0, end_step=2, every=1,
                         exclude=["attention"], name="ffn"),
        MaskTraining(0.5, include=["attention"], reset_every=2, score_lr=0.05,
                     freeze="none", make_permanent=False),
        MaskRecorder(str(tmp_path)),
    ]  # fmt: skip
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn", max_steps=3),
        callbacks=callbacks,
    )
    trainer.fit(LightningToy())
    r0, r1 = (json.loads((tmp_path / f"masks{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    assert r0["MagnitudePruning[ffn]"]["n"] > 0 and r0["MaskTraining"]["n"] > 0
