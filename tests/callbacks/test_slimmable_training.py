"""SlimmableTraining on real easy-VQA data: sandwich steps, teacher distillation, every
submodel evaluated with its cost, exact resume, a per-submodel table and plot."""

import json

import pytest
import torch

from vlcompress.callbacks import SlimmableTraining, distillation_loss
from vlcompress.compress.slimmable import Submodel
from vlcompress.config import load_experiment
from vlcompress.run import run_experiment

MODEL = (
    "model.options={visual_input: grid, grid_channels: [8, 8, 16, 16], grid_cells: 16, "
    "width_adapters: true, num_layers: 3}"
)
SPACE = "[[0.25, '1/3'], [0.5, '2/3'], [0.75, 1], [1, 1]]"
FAST = [
    "data.options.eval_batch_size=64",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
]


def slim_cb(teacher, **kw):
    opts = {"space": SPACE, "distill": "teacher", "teacher": f"'{teacher}'", "sample": 1, **kw}
    body = ", ".join(f"{k}: {v}" for k, v in opts.items())
    return f"callbacks=[{{name: slimmable_training, options: {{{body}}}}}]"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from quick_run import TINY_RUN

    out = tmp_path_factory.mktemp("teacher")
    run_experiment(
        *load_experiment(
            "default", [*TINY_RUN, *FAST, MODEL, f"output_dir={out}", "trainer.max_epochs=1"]
        )
    )
    return out


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="teacher="):
        SlimmableTraining(distill="teacher")
    with pytest.raises(ValueError, match="gt_weight"):
        SlimmableTraining(distill="none")
    with pytest.raises(ValueError, match="space"):
        SlimmableTraining(space=[[2, 1]], distill="inplace")
    with pytest.raises(ValueError, match="distill"):
        SlimmableTraining(distill="self")


def test_sampling_is_a_function_of_seed_and_step():
    a = SlimmableTraining(distill="inplace", seed=3)
    b = SlimmableTraining(distill="inplace", seed=3)
    seq = [a.submodels_at(s) for s in range(20)]
    assert seq == [b.submodels_at(s) for s in range(20)]
    assert all(s[0] == Submodel(1, 1) and s[1] == Submodel(0.25, 1 / 6) for s in seq)
    assert all(len(s) == 5 and len(set(s)) == 5 for s in seq)
    assert len({tuple(s) for s in seq}) > 5  # the random three change from step to step


def test_distillation_losses():
    t = torch.tensor([[3.0, -3.0, 0.0]])
    assert distillation_loss(t, t, "kl").abs() < 1e-6
    # BCE to sigmoid targets is smallest at the teacher's own logits
    assert distillation_loss(t, t, "bce") < distillation_loss(t * 0.5, t, "bce")


@pytest.fixture(scope="module")
def bst_run(tmp_path_factory, teacher):
    from quick_run import TINY_RUN

    out = tmp_path_factory.mktemp("bst")
    cfg, raw = load_experiment(
        "default",
        [*TINY_RUN, *FAST, MODEL, f"output_dir={out}", slim_cb(teacher), "trainer.max_epochs=1"],
    )
    return out, run_experiment(cfg, raw)


def test_bst_run_end_to_end(bst_run):
    out, results = bst_run
    rep = results["callbacks"]["SlimmableTraining"]
    assert rep["steps"] == 6 and rep["distill"] == "teacher"
    assert rep["val_submodels"] and len(rep["val_submodels"]) == 4
    table = rep["test_submodels"]
    assert [r["submodel"] for r in table] == ["w1/4-d1/3", "w1/2-d2/3", "w3/4-d1", "w1-d1"]
    params = [r["parameters"] for r in table]
    macs = [r["macs"] for r in table]
    assert params == sorted(params) and macs == sorted(macs) and macs[0] < macs[-1] / 4
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["examples"] > 0 for r in table)
    # the full submodel's accuracy is the task's own test accuracy
    assert table[-1]["accuracy"] == pytest.approx(results["test"]["accuracy"], abs=1e-6)
    assert (out / "slimmable.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert saved["callbacks"]["SlimmableTraining"]["test_submodels"] == table
    assert any(r[0] == "test acc w1/4-d1/3" for r in saved["callback_rows"])


def test_export_cli_table_budget_and_standalone_model(bst_run, tmp_path):
    from vlcompress.cli import main
    from vlcompress.compress.submodels import load_export

    out, results = bst_run
    table = {r["submodel"]: r for r in results["callbacks"]["SlimmableTraining"]["test_submodels"]}
    val = {
        r["submodel"]: r["accuracy"]
        for r in results["callbacks"]["SlimmableTraining"]["val_submodels"]
    }
    assert main(["export", str(out), "--table", "--large-batch", "8"]) == 0
    rows = json.loads((out / "submodels.json").read_text())["rows"]
    assert [r["submodel"] for r in rows] == list(table)
    for r in rows:  # the same costs as the callback counted, the run's accuracy joined
        assert r["macs"] == table[r["submodel"]]["macs"]
        assert r["parameters"] == table[r["submodel"]]["parameters"]
        assert r["test_accuracy"] == table[r["submodel"]]["accuracy"] and r["latency_b1_ms"] > 0
        assert r["val_accuracy"] == val[r["submodel"]]
    assert "| w1/4-d1/3 |" in (out / "submodels.md").read_text()
    # budget: the submodel most accurate on validation within half the full model's MACs
    limit = table["w1-d1"]["macs"] / 2
    assert main(["export", str(out), f"budget=macs={limit}", "--no-latency",
                 "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    rec = json.loads((tmp_path / "b" / "export.json").read_text())
    fits = [r for r in table.values() if r["macs"] <= limit]
    assert rec["val_accuracy"] == max(val[r["submodel"]] for r in fits)
    assert rec["reload_max_abs_diff"] == 0.0
    model = load_export(tmp_path / "b")
    assert sum(p.numel() for p in model.parameters()) == table[rec["submodel"]]["parameters"]
    assert (tmp_path / "b" / "experiment.yaml").is_file()
    # explicit width / depth, and clear errors
    assert main(["export", str(out), "width=1/2", "depth=2/3", "--out", str(tmp_path / "w")]) == 0
    assert json.loads((tmp_path / "w" / "export.json").read_text())["submodel"] == "w1/2-d2/3"
    assert main(["export", str(out), "width=1/2"]) == 1
    assert main(["export", str(out), "budget=macs=1"]) == 1
    assert main(["export", str(tmp_path / "nothing"), "--table"]) == 1


def test_student_starts_from_the_teacher(tmp_path, tiny_run, teacher):
    from vlcompress.utils.init_from import resolve_init_path

    t_state = torch.load(resolve_init_path(str(teacher)), weights_only=False)["state_dict"]
    cfg, raw = load_experiment(
        "default",
        [*tiny_run, *FAST, MODEL, f"output_dir={tmp_path / 's'}", slim_cb(teacher),
         "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "optim.lr=1e-12",
         "trainer.max_epochs=1",
         "optim.weight_decay=0.0"],
    )  # fmt: skip
    run_experiment(cfg, raw)
    s_state = torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", weights_only=False)
    s_state = s_state["state_dict"]
    # lr ~ 0: the student is (up to 1e-12 steps) the teacher it was initialised from
    for k, v in t_state.items():
        if k.startswith("model.") and "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(s_state[k], v, rtol=0, atol=1e-9)


def test_resume_continues_exactly(tmp_path, tiny_run, teacher):
    def cfg(out, *extra):
        return load_experiment(
            "default", [*tiny_run, *FAST, MODEL, f"output_dir={out}", slim_cb(teacher), *extra]
        )

    run_experiment(*cfg(tmp_path / "straight", "trainer.max_epochs=2"))
    run_experiment(*cfg(tmp_path / "cut", "trainer.max_epochs=1"))
    run_experiment(*cfg(tmp_path / "cut", "trainer.max_epochs=2", "resume=true"))
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_teardown_leaves_a_plain_model_in_a_foreign_lightning_module(tmp_path):
    """On someone else's LightningModule (a toy BERT task): the sandwich trains, and after
    ``fit`` the module has its own training step back, no hooks, plain module classes."""
    import lightning.pytorch as lp
    from callback_toys import LightningToy
    from torch import nn

    toy = LightningToy()
    cb = SlimmableTraining(space=[[1, "1/2"], [1, 1]], distill="none", gt_weight=1.0)
    before = {k: v.clone() for k, v in toy.model.state_dict().items()}
    trainer = lp.Trainer(max_epochs=1, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(toy)
    assert cb.steps == 3  # every step ran the sandwich (largest + smallest)
    assert any(not torch.equal(before[k], v) for k, v in toy.model.state_dict().items())
    assert "training_step" not in toy.__dict__ and cb.slim is None and cb.teacher is None
    assert not toy.model._forward_hooks
    kinds = {type(m) for m in toy.model.modules()}
    assert nn.Linear in kinds and nn.LayerNorm in kinds
    assert not any(t.__name__.startswith("Sliced") for t in kinds)
    assert all("forward" not in m.__dict__ for m in toy.model.modules())  # no layer skipped
