"""CompressionCallback: arguments, anatomy, checkpointed state and resume, both Lightning
packages, reports."""

from __future__ import annotations

import json
import types

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import STEPS_PER_EPOCH, LightningToy, RandomHeadDropper, trainer_kwargs
from torch import nn

from vlcompress.callbacks import CompressionCallback, collect_report_rows, collect_reports

SOLO = types.SimpleNamespace(global_rank=0, world_size=1, global_step=0)
"""Stands in for a one-process trainer where a test calls setup() directly."""


# ---------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": -1}, ValueError, r"seed must be in \[0, .*got -1"),
        ({"seed": "3"}, TypeError, r"seed must be int; got '3' \(str\)"),
        ({"seed": True}, TypeError, r"seed must be int; got True \(bool\)"),
        ({"model_attr": 3}, TypeError, r"model_attr must be None, a dotted .*got int"),
        ({"model_attr": "model..bert"}, ValueError, r"model_attr must be a dotted .*'model..bert'"),
        (
            {"patterns": {"layer": "x"}},
            TypeError,
            r"patterns must be None or .*AnatomyPatterns; got dict",
        ),
        ({"name": " "}, ValueError, r"name must be None or a non-empty str; got ' '"),
        (
            {"fraction": 1.5},
            ValueError,
            r"RandomHeadDropper: fraction must be in \[0.0, 1.0\]; got 1.5",
        ),
        ({"fraction": "half"}, TypeError, r"fraction must be float; got 'half'"),
        ({"every_n_steps": 2.0}, TypeError, r"every_n_steps must be int; got 2.0 \(float\)"),
    ],
)
def test_init_names_the_bad_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        RandomHeadDropper(**kwargs)


def test_init_is_cheap_and_accepts_good_arguments():
    cb = RandomHeadDropper(fraction=1, seed=7, name="a", model_attr=lambda m: m.model)
    assert cb.fraction == 1.0 and isinstance(cb.fraction, float)
    assert cb.state_key == "RandomHeadDropper[a]"
    assert RandomHeadDropper().state_key == "RandomHeadDropper"
    with pytest.raises(RuntimeError, match="found in setup"):
        cb.anatomy  # noqa: B018


# ---------------------------------------------------------------------- anatomy
def test_anatomy_found_on_the_model_attribute_of_the_module():
    cb = RandomHeadDropper(seed=0)
    module = LightningToy()
    cb.setup(SOLO, module, "fit")
    assert cb.model is module.model
    assert [a.name for a in cb.anatomy.attentions] == [
        "encoder.layer.0.attention",
        "encoder.layer.1.attention",
    ]


def test_model_attr_picks_another_attribute_and_names_the_missing_one():
    module = LightningToy(attr="backbone")
    cb = RandomHeadDropper(seed=0, model_attr="backbone")
    cb.setup(SOLO, module, "fit")
    assert cb.model is module.backbone and len(cb.anatomy.layers) == 2
    with pytest.raises(
        ValueError, match=r"model_attr='backbone.encoderr'.*no attribute 'encoderr'"
    ):
        RandomHeadDropper(seed=0, model_attr="backbone.encoderr").setup(SOLO, module, "fit")


def test_unrecognised_model_error_says_how_to_pass_patterns():
    module = LightningToy()
    module.model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(TypeError) as info:
        RandomHeadDropper(seed=0).setup(SOLO, module, "fit")
    msg = str(info.value)
    assert "RandomHeadDropper cannot find the structure of Sequential" in msg
    assert "RandomHeadDropper(patterns=AnatomyPatterns(" in msg
    assert "from vlcompress.models.anatomy import AnatomyPatterns" in msg


def test_user_patterns_are_used():
    from vlcompress.models.anatomy import BERT_PATTERNS

    module = LightningToy(attr="backbone")  # not under `model`: the module itself is searched
    cb = RandomHeadDropper(seed=0, patterns=BERT_PATTERNS)
    cb.setup(SOLO, module, "fit")
    assert cb.model is module
    assert cb.anatomy.attentions[0].name == "backbone.encoder.layer.0.attention"


def test_requires_anatomy_false_skips_the_search():
    class Counter(CompressionCallback):
        requires_anatomy = False

    cb = Counter(seed=1)
    cb.setup(SOLO, nn.Linear(2, 2), "fit")  # no anatomy, no error
    with pytest.raises(RuntimeError, match="requires_anatomy = False"):
        cb.anatomy  # noqa: B018


# ---------------------------------------------------------------------- decisions
def test_generator_depends_on_seed_step_and_salt_only():
    a, b = RandomHeadDropper(seed=5), RandomHeadDropper(seed=5)
    torch.manual_seed(123)  # global RNG state is irrelevant
    x = torch.rand(4, generator=a.generator(step=3))
    torch.manual_seed(456)
    assert torch.equal(x, torch.rand(4, generator=b.generator(step=3)))
    assert not torch.equal(x, torch.rand(4, generator=b.generator(step=4)))
    assert not torch.equal(x, torch.rand(4, generator=b.generator(step=3, salt="other")))


def test_decide_and_broadcast_on_one_process_just_run():
    cb = RandomHeadDropper(seed=0)
    assert cb.decide(lambda x: x + 1, 1) == 2
    assert cb.broadcast("x") == "x"
    assert cb.all_ranks(True) and not cb.any_rank(False)


# ---------------------------------------------------------------------- state
def test_state_must_load_with_weights_only():
    from vlcompress.models.anatomy import Modality

    class Careless(CompressionCallback):
        requires_anatomy = False

        def state(self):
            return {"sparsity": {Modality.VISION: 0.5}}

    with pytest.raises(TypeError, match=r"key <Modality.VISION.*use str or int keys"):
        Careless(seed=0).state_dict()


def _fit(trainer_cls, module, cb, tmp_path, max_steps):
    trainer = trainer_cls(**trainer_kwargs(tmp_path, max_steps=max_steps), callbacks=[cb])
    trainer.fit(module)
    return trainer


class Killed(Exception):
    """Stands in for a pre-emption."""


class _Kill(lp.Callback):
    """Kills the run (an exception, as a pre-emption would) when ``step`` is reached."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    epochs = 2
    full_cb = RandomHeadDropper(every_n_steps=2, seed=11)
    full = LightningToy()
    lp.Trainer(**trainer_kwargs(tmp_path / "full", max_epochs=epochs), callbacks=[full_cb]).fit(
        full
    )
    assert len(full_cb.history) == 1 + epochs * STEPS_PER_EPOCH // 2

    # Killed in the second epoch; the last checkpoint is from the end of the first.
    ckpt_dir = tmp_path / "ckpt"
    killed = lp.Trainer(
        **trainer_kwargs(tmp_path / "a", max_epochs=epochs, enable_checkpointing=True),
        callbacks=[
            RandomHeadDropper(every_n_steps=2, seed=11),
            lp.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True),
            _Kill(step=STEPS_PER_EPOCH + 1),
        ],
    )
    with pytest.raises(Killed):
        killed.fit(LightningToy())
    assert killed.global_step == STEPS_PER_EPOCH + 1
    saved = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == STEPS_PER_EPOCH
    assert saved["callbacks"]["RandomHeadDropper"]["seed"] == 11

    # Resumed by a fresh callback (another seed argument: the checkpoint's wins) and module.
    resumed_cb = RandomHeadDropper(every_n_steps=2, seed=12)
    resumed = LightningToy()
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path / "b", max_epochs=epochs), callbacks=[resumed_cb]
    )
    trainer.fit(resumed, ckpt_path=ckpt_dir / "last.ckpt")

    assert resumed_cb.seed == 11
    assert resumed_cb.history == full_cb.history
    assert resumed_cb.masks.keys() == full_cb.masks.keys()
    assert all(torch.equal(resumed_cb.masks[k], full_cb.masks[k]) for k in full_cb.masks)
    # The masks were re-applied on resume: training continued exactly.
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_two_instances_share_a_checkpoint(tmp_path):
    a = RandomHeadDropper(seed=1, name="a")
    b = RandomHeadDropper(seed=2, name="b", fraction=0.25)
    trainer = lp.Trainer(**trainer_kwargs(tmp_path, max_steps=1), callbacks=[a, b])
    trainer.fit(LightningToy())
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    states = torch.load(tmp_path / "x.ckpt", weights_only=True)["callbacks"]
    assert states["RandomHeadDropper[a]"]["seed"] == 1
    assert states["RandomHeadDropper[b]"]["seed"] == 2


# ---------------------------------------------------------------------- both packages
def test_same_callback_under_both_lightning_packages(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from callback_toys import PLToy

    cb_new = RandomHeadDropper(every_n_steps=1, seed=3)
    _fit(lp.Trainer, LightningToy(), cb_new, tmp_path / "lightning", 2)

    cb_old = RandomHeadDropper(every_n_steps=1, seed=3)
    assert isinstance(cb_old, pl.Callback) and isinstance(cb_old, lp.Callback)
    # A single callback (not a list) passes pytorch_lightning's isinstance check too.
    trainer = pl.Trainer(**trainer_kwargs(tmp_path / "pl", max_steps=2), callbacks=cb_old)
    trainer.fit(PLToy())
    assert trainer.callbacks[0] is cb_old

    assert cb_old.history == cb_new.history and len(cb_old.history) == 3
    trainer.save_checkpoint(tmp_path / "pl.ckpt")
    states = torch.load(tmp_path / "pl.ckpt", weights_only=True)["callbacks"]
    assert states["RandomHeadDropper"]["state"]["history"] == cb_old.history


# ---------------------------------------------------------------------- reports
def test_reports_are_collected_by_state_key():
    a = RandomHeadDropper(seed=0, name="a")
    a.setup(SOLO, LightningToy(), "fit")
    a.on_train_start(SOLO, None)
    other = nn.Identity()  # not a reporting callback: ignored
    reports = collect_reports([a, other])
    assert reports == {"RandomHeadDropper[a]": {"heads_off": 2, "draws": 1}}
    json.dumps(reports)
    assert collect_report_rows([other, a]) == [("heads switched off", "2")]

    class Bad(CompressionCallback):
        requires_anatomy = False

        def report(self):
            return {"t": torch.ones(1)}

    with pytest.raises(TypeError, match=r"Bad.report\(\) is not JSON-serialisable"):
        collect_reports([Bad(seed=0)])
