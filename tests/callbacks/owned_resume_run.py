"""One phase of the owned-module resume test, in its own process (the test kills it).

python owned_resume_run.py PACKAGE DEVICES OUT PHASE
  PACKAGE: lightning.pytorch | pytorch_lightning;  DEVICES: 1 | 2 (ddp_spawn, gloo)
  PHASE: full (3 epochs), killed (SIGKILL at step 4, after the first epoch's checkpoint (3 steps an epoch
         on 1 process, 2 on 2)),
         resume (from that checkpoint to the end)
Every rank writes OUT/<phase>_rank<r>.pt at teardown: the model's weights, the callback's
state and what is left on the module (hooks, instance attributes).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from callback_toys import AdapterDistiller, trainer_kwargs  # noqa: E402


class _Recorder:
    """Kills the run at step 4 (phase ``killed``); at teardown, after AdapterDistiller's,
    writes what this rank ends with."""

    def __init__(self, phase: str, out: Path) -> None:
        self.phase, self.out = phase, out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.phase == "killed" and trainer.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    def teardown(self, trainer, pl_module, stage):
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pl_module.modules())
        torch.save(
            {
                "model": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                "callback": trainer.callbacks[0].state_dict(),
                "hooks": hooks,
                "instance": sorted(k for k in ("training_step", "log") if k in vars(pl_module)),
                "step": trainer.global_step,
            },
            self.out / f"{self.phase}_rank{trainer.global_rank}.pt",
        )


import lightning.pytorch as lp  # noqa: E402


class LightningRecorder(_Recorder, lp.Callback):
    pass


try:
    import pytorch_lightning as pl
except ImportError:
    pl = None
else:

    class PLRecorder(_Recorder, pl.Callback):
        pass


def main() -> None:
    package, devices, out, phase = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    import callback_toys

    if package == "lightning.pytorch":
        pkg, toy, recorder = lp, callback_toys.LightningToy, LightningRecorder
    else:
        pkg, toy, recorder = pl, callback_toys.PLToy, PLRecorder
    ckpt = pkg.callbacks.ModelCheckpoint(
        dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True
    )
    extra = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pkg.Trainer(
        **trainer_kwargs(out, devices=devices, max_epochs=3, enable_checkpointing=True, **extra),
        callbacks=[AdapterDistiller(), recorder(phase, out), ckpt],
    )
    resume = str(next((out / "ckpt").glob("epoch=0-*.ckpt"))) if phase == "resume" else None
    trainer.fit(toy(), ckpt_path=resume)


if __name__ == "__main__":
    main()
