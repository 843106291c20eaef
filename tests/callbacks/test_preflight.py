"""``CompressionCallback.preflight``: the problems a callback would hit on a model, found on a
model built on the meta device, and raised by ``setup`` in the same words."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlcompress import registry
from vlcompress.callbacks import CompressionCallback

SOLO = type("Solo", (), {"world_size": 1, "global_rank": 0, "global_step": 0})()


@pytest.fixture(scope="module")
def mcan_meta() -> nn.Module:
    with torch.device("meta"):
        return registry.build("model", "mcan_small", {}, vocab_size=50, num_answers=10)


def test_base_preflight_is_clean_on_a_meta_model(mcan_meta):
    assert next(mcan_meta.parameters()).is_meta
    assert CompressionCallback().preflight(mcan_meta) == []


def test_base_preflight_reports_an_unrecognised_model_as_text():
    problems = CompressionCallback().preflight(nn.Sequential(nn.Linear(2, 2)))
    assert len(problems) == 1
    assert "cannot find the structure of Sequential" in problems[0]
    assert "AnatomyPatterns" in problems[0]


def test_no_anatomy_needed_means_no_anatomy_problem():
    class Counter(CompressionCallback):
        requires_anatomy = False

    assert Counter().preflight(nn.Linear(2, 2)) == []


def test_setup_raises_the_preflight_problems():
    class Picky(CompressionCallback):
        def preflight(self, model):
            return super().preflight(model) + ["option x: bad; set x=1", "option y: bad"]

    module = nn.Module()
    with torch.device("meta"):
        module.model = registry.build("model", "mcan_small", {}, vocab_size=50, num_answers=10)
    with pytest.raises(ValueError, match=r"Picky: option x: bad; set x=1; option y: bad$"):
        Picky(seed=0).setup(SOLO, module, "fit")


@pytest.fixture(scope="module")
def mcan_slim_meta() -> nn.Module:
    with torch.device("meta"):
        return registry.build(
            "model", "mcan_small", {"width_adapters": True}, vocab_size=50, num_answers=10
        )


def _vlcompress(cb: CompressionCallback) -> CompressionCallback:
    cb.within_vlcompress_run = True
    return cb


def test_structured_pruning_preflight(mcan_meta):
    from vlcompress.callbacks import StructuredPruning

    assert StructuredPruning(heads=0.5).preflight(mcan_meta) == []
    assert StructuredPruning(neurons={"language": 0.5}).preflight(mcan_meta) == []
    (problem,) = _vlcompress(StructuredPruning()).preflight(mcan_meta)  # the defaults
    assert problem.startswith("nothing to prune: options.heads=0.0 and options.neurons=0.0")
    assert "fraction of attention heads" in problem and "{heads: 0.5}" in problem
    problems = StructuredPruning(heads={"vision": 0.5}).preflight(mcan_meta)
    assert problems[0].startswith("heads['vision']: MCAN has no attention blocks of modality")
    assert problems[1].startswith("nothing to prune")


def test_structured_pruning_fraction_messages_say_what_is_removed():
    from vlcompress.callbacks import StructuredPruning

    with pytest.raises(ValueError, match=r"heads must be in \[0, 1\) \(the fraction of attention"):
        StructuredPruning(heads=1.5)
    with pytest.raises(ValueError, match=r"neurons\['language'\].*fraction of FFN units"):
        StructuredPruning(neurons={"language": 1.0})


def test_pruning_preflight(mcan_meta, tmp_path):
    from vlcompress.callbacks import MagnitudePruning, MaskTraining

    assert MagnitudePruning(0.5).preflight(mcan_meta) == []
    assert MaskTraining({"language": 0.6, "vision": 0.04, "cross": 0.6}).preflight(mcan_meta) == []
    (problem,) = MaskTraining(0.5, include=["nothing_matches"]).preflight(mcan_meta)
    assert problem.startswith("nothing to prune: the anatomy declares")
    (problem,) = MagnitudePruning(0.5, include=["("]).preflight(mcan_meta)
    assert problem.startswith("bad include/exclude pattern")
    missing = tmp_path / "stage2"
    (problem,) = _vlcompress(MagnitudePruning(masks_from=str(missing))).preflight(mcan_meta)
    assert problem.startswith(f"options.masks_from: {missing} does not exist; give the run")
    assert MagnitudePruning(masks_from="init").preflight(mcan_meta) == []  # checked at the start


def test_pruning_preflight_names_a_modality_without_weights():
    from transformers import BertConfig, BertModel

    from vlcompress.callbacks import MagnitudePruning

    with torch.device("meta"):
        bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64))  # fmt: skip
    (problem,) = MagnitudePruning({"language": 0.5, "vision": 0.5}).preflight(bert)
    assert problem.startswith("sparsity['vision']: BertModel has no prunable weights of")
    assert MagnitudePruning({"language": 0.5}).preflight(bert) == []


def test_slimmable_training_preflight(mcan_meta, mcan_slim_meta, tmp_path):
    from vlcompress.callbacks import SlimmableTraining

    assert SlimmableTraining().preflight(mcan_slim_meta) == []
    assert SlimmableTraining(space=[[1, "1/3"], [1, 1]]).preflight(mcan_meta) == []  # depth only
    (problem,) = _vlcompress(SlimmableTraining()).preflight(mcan_meta)
    assert problem.startswith("options.space has widths ['1/4', '1/2', '3/4'] below 1, but MCAN")
    assert "width_adapters: true" in problem
    teacher = tmp_path / "seed001_teacher"
    cb = _vlcompress(SlimmableTraining(distill="teacher", teacher=str(teacher)))
    (problem,) = cb.preflight(mcan_slim_meta)
    assert problem == (
        f"options.teacher: {teacher} does not exist; train the teacher (the full model, same "
        "model and data) first: the experiment's seed001_teacher_* companion, e.g. make train "
        "EXP=seed001_teacher_mcan_easy_vqa; or point options.teacher at an existing run "
        "folder or .ckpt file"
    )
    (problem,) = SlimmableTraining(distill="teacher", teacher=str(teacher)).preflight(
        mcan_slim_meta
    )
    assert problem.startswith(f"teacher: {teacher} does not exist; train the teacher")
    (teacher / "checkpoints").mkdir(parents=True)
    (teacher / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert cb.preflight(mcan_slim_meta) == []


def test_slimmable_training_preflight_on_hugging_face_models():
    from transformers import BertConfig, BertModel, ViltConfig, ViltModel

    from vlcompress.callbacks import SlimmableTraining

    with torch.device("meta"):
        bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=64))  # fmt: skip
        vilt = ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=32, patch_size=16))  # fmt: skip
    (problem,) = SlimmableTraining().preflight(bert)
    assert problem.startswith("BertModel returns hidden states, not logits")
    assert "logits_fn=lambda pl_module, output:" in problem
    assert SlimmableTraining(logits_fn=lambda pl, out: out).preflight(bert) == []
    assert SlimmableTraining(distill="none", gt_weight=1.0).preflight(bert) == []
    (problem,) = SlimmableTraining(distill="none", gt_weight=1.0).preflight(vilt)
    assert "ViltModel cannot be width-slimmed" in problem and "depth only" in problem
    depth = SlimmableTraining(space=[[1, "1/2"], [1, 1]], distill="none", gt_weight=1.0)
    assert depth.preflight(vilt) == []
