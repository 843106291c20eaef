"""End to end on real easy-VQA data with a tiny MCAN: run folder, exact resume, NaN guard."""

import csv
import json

import pytest
import torch

from vlcompress import registry
from vlcompress.callbacks import NonFiniteLossError
from vlcompress.config import load_experiment
from vlcompress.losses import BCELoss
from vlcompress.run import run_experiment


@pytest.fixture
def tiny(tiny_run):
    def make(out, *extra):
        return load_experiment("default", [*tiny_run, f"output_dir={out}", *extra])

    return make


def test_run_folder_contents(tmp_path, tiny):
    cfg, raw = tiny(tmp_path, "trainer.max_epochs=2")
    results = run_experiment(cfg, raw)
    for f in (
        "config.yaml",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
        "metrics.csv",
        "results.json",
        "curves.png",
        "data_report.json",
        "run.log",
    ):
        assert (tmp_path / f).is_file(), f
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    test = saved["test"]
    assert 0.0 <= test["accuracy"] <= 1.0
    assert set(test["answer_type"]) <= {"yes/no", "other"} and test["question_type"]
    assert saved["parameters"]["total"] > 0 and saved["flops_per_sample"] > 0
    assert saved["train_wall_time_s"] > 0 and saved["global_steps"] == 12
    assert saved["training"]["stopped_by"] == "completed"
    assert saved["training"]["steps_planned"] == 12
    hparams = (tmp_path / "tensorboard" / "hparams.yaml").read_text()
    assert "trainer.max_epochs: 2" in hparams and "model.name: mcan_tiny" in hparams
    # Callbacks report into results.json and the results table.
    assert saved["callbacks"]["FiniteLossGuard"] == {"checked_losses": 12}
    assert ["finite losses checked", "12"] in saved["callback_rows"]
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert any(r.get("val/acc") for r in rows) and any(r.get("train/loss") for r in rows)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_resume_continues_exactly(tmp_path, tiny):
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    run_experiment(*tiny(straight, "trainer.max_epochs=2"))
    first = run_experiment(*tiny(cut, "trainer.max_epochs=1"))
    saved = torch.load(cut / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    resumed = run_experiment(*tiny(cut, "trainer.max_epochs=2", "resume=true"))
    # the wall time covers both launches (the first up to the checkpoint it saved), not only
    # the one since the resume
    earlier, launch = saved["vlcompress_train_time_s"], resumed["this_launch_train_wall_time_s"]
    assert 0 < earlier <= first["train_wall_time_s"]
    assert earlier + 0.5 * launch < resumed["train_wall_time_s"] <= earlier + launch + 0.01
    assert resumed["training"]["steps"] == resumed["training"]["steps_planned"] == 12
    a, b = _weights(straight / "checkpoints/last.ckpt"), _weights(cut / "checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader((cut / "metrics.csv").open()))
    assert sorted({r["epoch"] for r in rows if r.get("val/acc")}) == ["0", "1"]  # history kept


def test_log_interval_follows_the_run_length(easy_vqa_dm):
    from vlcompress.config.schema import TrainerConfig
    from vlcompress.run import log_interval

    batches = len(easy_vqa_dm.train_dataloader())
    assert log_interval(TrainerConfig(max_epochs=1, limit_train_batches=6), easy_vqa_dm) == 1
    long = TrainerConfig(max_epochs=20)
    assert log_interval(long, easy_vqa_dm) == min(50, batches * 20 // 50)
    assert log_interval(TrainerConfig(log_every_n_steps=7), easy_vqa_dm) == 7  # as given
    short = TrainerConfig(max_epochs=3, max_steps=100)
    assert log_interval(short, easy_vqa_dm) == 2  # 100 steps: a point every 2


def test_resume_without_checkpoint_is_explained(tmp_path, tiny):
    from vlcompress.config import ConfigError

    cfg, raw = tiny(tmp_path, "resume=true")
    with pytest.raises(ConfigError, match="last.ckpt does not exist; start a new run without"):
        run_experiment(cfg, raw)


class NaNAtCall(BCELoss):
    """BCE whose ``at``-th training call returns NaN (a registered loss, as a user would add)."""

    def __init__(self, at: int = 9) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, batch, extras):
        loss = super().forward(logits, batch, extras)
        if not self.training:  # validation / test: untouched
            return loss
        self.calls += 1
        return loss * float("nan") if self.calls == self.at else loss


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, tiny):
    with registry.isolated():
        registry.register("loss", "nan_at")(NaNAtCall)
        cfg, raw = tiny(tmp_path, "trainer.max_epochs=3", "loss.name=nan_at", "loss.options.at=9")
        # 6 training batches per epoch: the 9th training loss is step 8 (epoch 1, batch 2).
        with pytest.raises(NonFiniteLossError, match=r"global step 8 \(epoch 1, batch 2\)"):
            run_experiment(cfg, raw)
    ckpt = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6  # the end of epoch 0, the last good state
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


def test_last_checkpoint_follows_every_epoch_even_without_improvement(tmp_path, tiny):
    # lr ~0: validation accuracy never improves after epoch 0, best.ckpt stays at epoch 0
    cfg, raw = tiny(tmp_path, "trainer.max_epochs=3", "optim.lr=1e-12")
    run_experiment(cfg, raw)
    last = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(tmp_path / "checkpoints/best.ckpt", map_location="cpu", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (2, 18)
    assert best["global_step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]
