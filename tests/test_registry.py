"""The registry and the contracts every registered component must meet.

These tests are parametrised over the registry, so a new model, data module, loss, callback or
task is covered as soon as its file registers it."""

import dataclasses
import json

import pytest
import torch

from vlcompress import registry
from vlcompress.data import VLBatch, check_data_contract
from vlcompress.losses import LossContext, VQALoss
from vlcompress.models import anatomy_of
from vlcompress.models.contract import EXTRAS, READOUTS, SlimmableVQAModel, VQAModel
from vlcompress.options import ModelOptions


def test_every_kind_has_components():
    for kind in registry.KINDS:
        assert registry.names(kind), kind
    assert "mcan_small" in registry.names("model", "mcan_*")
    assert registry.names("model", "nothing*") == []


@pytest.mark.parametrize("kind,name", [(k, n) for k in registry.KINDS for n in registry.names(k)])
def test_component_declares_options_and_docs(kind, name):
    comp = registry.get(kind, name)
    assert dataclasses.is_dataclass(comp.options)
    assert comp.summary, f"{kind} {name}: give the builder a docstring"
    comp.make_options({})  # the defaults are valid on their own
    for f in dataclasses.fields(comp.options):  # every option has a default (YAML may omit it)
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


@pytest.mark.parametrize("name", registry.names("model"))
def test_model_builds_and_declares_its_anatomy(name):
    vocab = 30522 if name.endswith("_mini") else 50  # MiniLM's WordPiece vocabulary, fixed
    with torch.device("meta"):  # sizes only: published variants are large
        model = registry.build("model", name, vocab_size=vocab, num_answers=7)
    an = anatomy_of(model)
    an.validate(model)
    assert an.layers and an.attentions and an.ffns


def _meta_model(name: str, **options):
    vocab = 30522 if name.endswith("_mini") else 50  # MiniLM's WordPiece vocabulary, fixed
    with torch.device("meta"):  # sizes only: published variants are large
        return registry.build("model", name, options, vocab_size=vocab, num_answers=7)


@pytest.mark.parametrize("name", registry.names("model"))
def test_model_meets_the_contract(name):
    """Every registered model is a ``VQAModel``: options that rebuild it, sizes, extras,
    anatomy with the read-outs; one with ``slimmed_options`` is a ``SlimmableVQAModel``."""
    model = _meta_model(name)
    assert isinstance(model, VQAModel), f"model {name!r} lacks a member of VQAModel"
    assert isinstance(model.options, ModelOptions)
    assert model.options == registry.get("model", name).make_options({})
    assert model.num_answers == 7 and model.returns_extras is True
    assert isinstance(model.pooled_dim, int) and isinstance(model.question_dim, int)
    missing = set(READOUTS) - set(model.anatomy().readouts)
    assert not missing, f"model {name!r}: the anatomy names no read-out {sorted(missing)}"
    assert model.anatomy().head_modules, f"model {name!r}: the anatomy names no task head"
    again = _meta_model(name, **dataclasses.asdict(model.options))  # what an export records
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in again.state_dict().items()} == shapes
    if hasattr(model, "slimmed_options"):
        assert isinstance(model, SlimmableVQAModel)


def test_each_model_variant_has_its_own_summary():
    summaries = {n: registry.get("model", n).summary for n in registry.names("model")}
    shared = {s for s in summaries.values() if list(summaries.values()).count(s) > 1}
    assert not shared, f"variants sharing a summary: {shared}"


PIXEL_INPUT = {  # options under which a tiny model reads 64x64 pixels
    "mcan_tiny": {"visual_input": "grid"},
    "lxmert_tiny": {"visual_input": "pixels"},
    "uniter_tiny": {"visual_input": "pixels"},
    "clip_vil_tiny": {},
    "vilt_tiny": {},
    "meter_tiny": {},
}


@pytest.mark.parametrize("name", registry.names("model", "*_tiny"))
def test_tiny_model_forward_meets_the_contract(name):
    """``forward(batch)`` gives ``(B, num_answers)`` logits; with ``return_extras``, the
    extras have the declared sizes; through ``nn.Module.__call__``."""
    assert name in PIXEL_INPUT, f"add the options under which {name!r} reads pixels to this test"
    torch.manual_seed(0)
    model = registry.build("model", name, PIXEL_INPUT[name], vocab_size=50, num_answers=7).eval()
    b = 3
    ids = torch.randint(1, 50, (b, 6))
    ids[0, 4:] = 0
    batch = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.rand(b, 3, 64, 64))
    with torch.no_grad():
        logits = model(batch)
        again, extras = model(batch, return_extras=True)
    assert logits.shape == (b, model.num_answers)
    torch.testing.assert_close(again, logits)
    assert set(EXTRAS) <= set(extras)
    assert extras["pooled"].shape == (b, model.pooled_dim)
    assert extras["question"].shape == (b, model.question_dim)


@pytest.mark.parametrize("name", registry.names("loss"))
def test_loss_contract(name):
    torch.manual_seed(0)
    b, a, q = 4, 7, 3
    loss = registry.build("loss", name)
    assert isinstance(loss, VQALoss)
    prior = torch.rand(q, a)
    loss.setup(LossContext(a, ["x", "y", "z"], prior, pooled_dim=5))
    ids = torch.randint(1, 9, (b, 3))
    batch = VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, 2, 4),
        targets=torch.rand(b, a).round(), question_type_id=torch.tensor([0, 1, 2, 0]),
    )  # fmt: skip
    logits = torch.randn(b, a, requires_grad=True)
    extras = {"pooled": torch.randn(b, 5)}
    for training in (True, False):
        loss.train(training)
        value = loss(logits, batch, extras)
        assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", registry.names("callback"))
def test_callback_contract(name):
    cb = registry.build("callback", name)
    state = cb.state_dict()
    json.dumps({k: v for k, v in state.items() if not torch.is_tensor(v)}, default=str)
    again = registry.build("callback", name)
    again.load_state_dict(state)
    assert again.state_dict().keys() == state.keys()
    assert isinstance(cb.state_key, str)


@pytest.mark.parametrize("name", registry.names("datamodule"))
def test_datamodule_contract(name, easy_vqa_dm, tmp_path):
    from fixtures_vqa import fixture_datamodule

    set_up = {
        "easy_vqa": lambda: easy_vqa_dm,
        "vqa_v2": lambda: fixture_datamodule(tmp_path, "vqa_v2"),
        "vqa_cp_v2": lambda: fixture_datamodule(tmp_path, "vqa_cp_v2"),
        "gqa": lambda: _gqa(tmp_path),
        "easy_pairs": lambda: _easy_pairs(),
        "nlvr2": lambda: _nlvr2(tmp_path),
    }
    assert name in set_up, f"add a set-up instance of data module {name!r} to this test"
    dm = set_up[name]()
    assert check_data_contract(dm) == []
    info = dm.info()
    batch = next(iter(dm.train_dataloader()))
    assert batch.question_type_id is not None
    for qt, i in zip(batch.question_type, batch.question_type_id.tolist()):
        assert info.question_types[i] == qt


def _easy_pairs():
    from vlcompress.datamodules.easy_pairs import EasyPairsDataModule

    dm = EasyPairsDataModule(num_train=200, num_test=20, batch_size=16)
    dm.setup()
    return dm


def _nlvr2(tmp_path):
    from fixtures_nlvr2 import make, write_nlvr2

    root = tmp_path / "nlvr2"
    write_nlvr2(root)
    dm = make(root, root / "cache")
    dm.prepare_data()
    dm.setup()
    return dm


def _gqa(tmp_path):
    from fixtures_gqa import build, prepare_gqa

    dm = build(prepare_gqa(tmp_path / "gqa")["data_dir"])
    dm.setup()
    return dm


def test_register_rejects_a_second_builder_and_unknown_kinds():
    class Other(VQALoss):
        """Another loss."""

    with registry.isolated(), pytest.raises(ValueError, match="'bce' is registered twice"):
        registry.register("loss", "bce")(Other)
    with pytest.raises(ValueError, match="unknown component kind 'metric'"):
        registry.register("metric", "x")
    with pytest.raises(registry.UnknownComponentError, match="did you mean 'bce'"):
        registry.get("loss", "bec")


def test_options_from_signature_needs_defaults():
    def make(a: int, b: float = 1.0):
        """Needs a."""

    with pytest.raises(TypeError, match="argument 'a' has no default"):
        registry.options_from_signature(make)
    opts = registry.options_from_signature(make, context=("a",))
    assert [f.name for f in dataclasses.fields(opts)] == ["b"]


def test_a_broken_plugin_is_named_and_skipped(monkeypatch, caplog):
    import importlib.metadata as md

    class EP:
        def __init__(self, name, value, fail):
            self.name, self.value, self.fail = name, value, fail

        def load(self):
            if self.fail:
                raise ImportError("no module named 'missing_dep'")
            registry.register("loss", "plugin_loss")(PluginLoss)

    class PluginLoss(VQALoss):
        """A loss from a third-party package."""

    eps = [EP("broken", "broken_pkg.components", True), EP("good", "good_pkg.losses", False)]
    monkeypatch.setattr(md, "entry_points", lambda group: eps)
    with registry.isolated():
        monkeypatch.setattr(registry, "_LOADED", set(registry._LOADED) - {"plugins"})
        registry._load_plugins()
        assert "plugin_loss" in registry.names("loss")
    assert "plugin_loss" not in registry.names("loss")
    assert "plugin 'broken' (broken_pkg.components) failed to load" in caplog.text


@pytest.mark.parametrize("folder", ["callbacks", "datamodules"])
def test_a_source_folder_imported_by_its_bare_name_is_refused_clearly(folder):
    """``import callbacks`` from the repository root would register every component twice."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=root,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: the {folder}/ folder is installed as the package "
                           f"vlcompress.{folder}")  # fmt: skip
    assert "registered twice" not in proc.stderr
