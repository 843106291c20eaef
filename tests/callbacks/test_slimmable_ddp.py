"""Two real DDP processes (gloo on CPU): SlimmableTraining samples the same submodels on both
ranks (one seed, broadcast) and the ranks end with the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
from callback_toys import LightningToy, trainer_kwargs

from vlcompress.callbacks import SlimmableTraining


class SampleRecorder(lp.Callback):
    """Per rank: the slimming callback's seed, the submodels of every step, the weights."""

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir
        self.steps: list[list[str]] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, SlimmableTraining))
        self.steps.append([s.name for s in cb.submodels_at(trainer.global_step)])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, SlimmableTraining))
        record = {
            "seed": cb.seed,
            "steps": self.steps,
            "weights": sum(float(p.double().abs().sum()) for p in pl_module.parameters()),
        }
        Path(self.record_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_sampling_and_weights_agree_on_both_ranks(tmp_path):
    cb = SlimmableTraining(
        space=[[1, 0.5], [1, 1]],
        sample=1,
        include_ends=False,
        distill="none",
        gt_weight=1.0,
        seed=0,
    )
    trainer = lp.Trainer(
        **trainer_kwargs(
            tmp_path, devices=2, strategy="ddp_spawn_find_unused_parameters_true", max_steps=4
        ),
        callbacks=[cb, SampleRecorder(str(tmp_path))],
    )
    trainer.fit(LightningToy())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    assert len(r0["steps"]) == 4 and all(len(s) == 1 for s in r0["steps"])
    assert len({s[0] for s in r0["steps"]}) == 2  # both submodels were drawn
