"""Pipeline stages (``init_from``): a stage starts from the previous stage's weights with a
fresh optimiser and step counter, mismatches fail naming the fix, resume wins over init_from."""

import hashlib
import json
import shutil

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

import vlcompress.run as run_module
from vlcompress.config import ConfigError, load_experiment
from vlcompress.run import build_datamodule, build_task, run_experiment
from vlcompress.utils.init_from import apply_init_checkpoint, resolve_init_path


def _run(tiny_run, out, *extra):
    cfg, raw = load_experiment(
        "default", [*tiny_run, "data.options.split=cp", "trainer.max_epochs=1",
                    f"output_dir={out}", *extra],
    )  # fmt: skip
    return run_experiment(cfg, raw)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    from quick_run import TINY_RUN

    out = tmp_path_factory.mktemp("stage1")
    _run(TINY_RUN, out, "loss.name=lmh")
    return out


class _AtStart(Callback):
    """Records what training starts from."""

    def on_train_start(self, trainer, pl_module):
        self.step = trainer.global_step
        self.model = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.loss = {k: v.detach().clone() for k, v in pl_module.loss_fn.state_dict().items()}
        self.optimizer_state = dict(trainer.optimizers[0].state)
        self.init_checkpoint = pl_module.init_checkpoint


def test_stage_two_starts_from_stage_one(stage1, tmp_path, tiny_run, monkeypatch):
    at_start = _AtStart()
    build = run_module.build_callbacks
    monkeypatch.setattr(run_module, "build_callbacks", lambda *a: [*build(*a), at_start])
    results = _run(tiny_run, tmp_path / "s2", "loss.name=lmh", f"init_from={stage1}")
    ckpt = stage1 / "checkpoints" / "best.ckpt"  # the checkpoint stage 1 reports results of
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert at_start.step == 0 and at_start.optimizer_state == {}
    for k, v in at_start.model.items():
        torch.testing.assert_close(v, state[f"model.{k}"], rtol=0, atol=0)
    for k, v in at_start.loss.items():  # same loss, same options: the gate continues
        torch.testing.assert_close(v, state[f"loss_fn.{k}"], rtol=0, atol=0)
    assert "callbacks" in at_start.init_checkpoint
    assert "optimizer_states" not in at_start.init_checkpoint
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert results["init_from"] == {
        "path": str(ckpt.resolve()), "sha256": sha, "loaded": ["model", "loss"],
    }  # fmt: skip
    assert json.loads((tmp_path / "s2" / "run.json").read_text())["init_from"]["sha256"] == sha
    assert results["global_steps"] == 6  # a new step counter (6 batches), not a resume

    # resume wins: the stage-2 run continues from its own last.ckpt, without stage 1
    moved = shutil.move(stage1, tmp_path / "gone")
    try:
        again = _run(tiny_run, tmp_path / "s2", "loss.name=lmh", f"init_from={stage1}",
                     "resume=true", "trainer.max_epochs=2")  # fmt: skip
    finally:
        shutil.move(moved, stage1)
    assert again["global_steps"] == 12 and again["init_from"]["sha256"] == sha


def test_another_loss_starts_fresh_and_mismatches_fail_clearly(stage1, tiny_run):
    cfg, _ = load_experiment("default", [*tiny_run, "data.options.split=cp"])
    dm = build_datamodule(cfg.data, cfg.seed)

    def _task(*extra):
        cfg, raw = load_experiment("default", [*tiny_run, "data.options.split=cp", *extra])
        return build_task(cfg, dm), OmegaConf.to_container(raw, resolve=True)

    task, resolved = _task("loss.name=rubi", "loss.options.variant=original")
    fresh = {k: v.clone() for k, v in task.loss_fn.state_dict().items()}
    record = apply_init_checkpoint(task, resolved, stage1)
    assert record.loaded == ["model"]
    for k, v in task.loss_fn.state_dict().items():
        assert torch.equal(v, fresh[k])

    task, resolved = _task("model.options.hidden_size=32")
    with pytest.raises(
        ConfigError, match=r"model.options.hidden_size: the checkpoint's is \d+, this run's 32"
    ):
        apply_init_checkpoint(task, resolved, stage1)
    task, resolved = _task()
    task.answers = task.answers[::-1]
    with pytest.raises(ConfigError, match="answers: the checkpoint predicts the same number of"):
        apply_init_checkpoint(task, resolved, stage1)
    resolved["model"]["name"] = "mcan_small"
    with pytest.raises(ConfigError, match="model.name: the checkpoint's is 'mcan_tiny'"):
        apply_init_checkpoint(task, resolved, stage1)


def test_missing_or_empty_paths_fail_before_a_run_folder_is_made(tmp_path, tiny_run):
    with pytest.raises(ConfigError, match=f"init_from: {tmp_path / 'nope'} does not exist"):
        _run(tiny_run, tmp_path / "out", f"init_from={tmp_path / 'nope'}")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no checkpoints/last.ckpt"):
        resolve_init_path(tmp_path / "empty")
    with pytest.raises(ConfigError, match="init_from: an empty path"):
        load_experiment("default", ["init_from=''"])


def test_init_grow_puts_the_layers_where_the_depth_k_submodel_keeps_them(tmp_path, tiny_run):
    two = tmp_path / "two_layers"  # a 2 + 2-layer stage to grow from
    _run(tiny_run, two, "model.options.num_layers=2")
    cfg, _ = load_experiment("default", [*tiny_run, "data.options.split=cp"])
    dm = build_datamodule(cfg.data, cfg.seed)
    state = torch.load(two / "checkpoints" / "best.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]  # fmt: skip

    def _task(*extra):
        cfg, raw = load_experiment("default", [*tiny_run, "data.options.split=cp", *extra])
        return build_task(cfg, dm), OmegaConf.to_container(raw, resolve=True)

    deeper = ["model.options.num_layers=6", "model.options.zero_init_residual=true"]
    task, resolved = _task(*deeper)
    with pytest.raises(ConfigError, match=r"num_layers: the checkpoint's is 2, this run's 6"):
        apply_init_checkpoint(task, resolved, two)  # growing is asked for, not assumed
    fresh = {k: v.clone() for k, v in task.model.state_dict().items()}
    record = apply_init_checkpoint(task, resolved, two, grow=True)
    # BST's depth-1/3 submodel keeps encoder layers 0, 5 and decoder layers 5, 0: in index
    # order, the checkpoint's layer 0 goes to layer 0 and its layer 1 to layer 5 in both stacks
    assert record.loaded == [
        "model", "grown decoder 2->6 (into layers [0, 5])", "grown encoder 2->6 (into layers [0, 5])",
    ]  # fmt: skip
    where = {"0": "0", "5": "1"}
    for k, v in task.model.state_dict().items():
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder") and parts[1] not in where:
            assert torch.equal(v, fresh[k]), k  # a new layer: fresh
            continue
        if parts[0] in ("encoder", "decoder"):
            parts[1] = where[parts[1]]
        assert torch.equal(v, state["model." + ".".join(parts)]), k
    assert not task.model.encoder[1].ffn.down.weight.any()  # new layers: zero residual branch
    # a callback reading the stage's checkpoint (masks_from=init) sees the grown names
    init_state = task.init_checkpoint["state_dict"]
    assert torch.equal(init_state["model.decoder.5.ffn.up.weight"],
                       state["model.decoder.1.ffn.up.weight"])  # fmt: skip
    assert "model.decoder.1.ffn.up.weight" not in init_state

    task, resolved = _task("model.options.hidden_size=16", *deeper)
    with pytest.raises(ConfigError, match="hidden_size: the checkpoint's is"):
        apply_init_checkpoint(task, resolved, two, grow=True)  # only depths may grow
    task, resolved = _task("model.options.num_layers=1")
    with pytest.raises(ConfigError, match="num_layers: the checkpoint's is 2, this run's 1"):
        apply_init_checkpoint(task, resolved, two, grow=True)  # never shrink
    task, resolved = _task("model.options.grid_context_layers=3", *deeper)
    with pytest.raises(ConfigError, match="grid_context_layers"):
        apply_init_checkpoint(task, resolved, two, grow=True)  # not a layer stack
    with pytest.raises(ConfigError, match="init_grow: true grows .* no init_from"):
        load_experiment("default", ["init_grow=true"])
