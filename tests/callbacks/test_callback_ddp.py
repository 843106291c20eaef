"""Two real DDP processes (gloo on CPU): a CompressionCallback's decisions agree on every rank."""

from __future__ import annotations

import json

import lightning.pytorch as lp
from callback_toys import LightningToy, RandomHeadDropper, trainer_kwargs


def test_decisions_are_identical_on_both_ranks(tmp_path):
    cb = RandomHeadDropper(fraction=0.5, record_dir=str(tmp_path))  # seed=None: rank 0 picks it
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn", max_steps=1), callbacks=[cb]
    )
    trainer.fit(LightningToy())

    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    # Each rank alone would choose differently (rank-dependent generator) ...
    assert r0["local"] != r1["local"]
    # ... but decide() gives every rank rank 0's choice.
    assert r0["decided"] == r1["decided"] == r0["local"]
    assert len(r0["decided"]) == 2  # half of 2 layers x 2 heads
    # The seed chosen on rank 0 in setup, and so the step generator, agree without help.
    assert r0["seed"] == r1["seed"]
    assert r0["generated"] == r1["generated"]
