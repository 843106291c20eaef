"""The original RUBi (question-only branch): its definition, the branch trained but never the
question encoder, evaluation on the main logits alone, option checks, and a real MCAN run."""

import pytest
import torch
from torch import nn

from vlcompress import registry
from vlcompress.config import ConfigError, load_experiment
from vlcompress.data import VLBatch
from vlcompress.losses import LossContext, soft_cross_entropy
from vlcompress.run import run_experiment


def _loss(question_dim=6, num_answers=3, **options):
    loss = registry.build("loss", "rubi", {"variant": "original", **options})
    loss.setup(LossContext(num_answers, question_dim=question_dim))
    return loss.train()


def _case(seed=0):
    torch.manual_seed(seed)
    ids = torch.ones(4, 2, dtype=torch.long)
    targets = torch.tensor([[1.0, 0, 0], [0, 0.6, 0.3], [0, 0, 1], [0.3, 1, 0]])
    batch = VLBatch(text_ids=ids, text_mask=ids != 0, visual=torch.zeros(4, 1, 1), targets=targets)
    encoder = nn.Linear(5, 6)  # stands for the model's question encoder
    question = encoder(torch.randn(4, 5))
    logits = torch.randn(4, 3, requires_grad=True)
    return encoder, question, logits, batch


def test_loss_is_masked_ce_plus_question_only_ce():
    encoder, question, logits, batch = _case()
    loss = _loss(hidden_dims=[7])
    q = loss.question_branch(question)
    expected = soft_cross_entropy(logits * torch.sigmoid(q), batch.targets)
    expected = expected + 0.5 * soft_cross_entropy(loss.question_head(q), batch.targets)
    got = _loss(hidden_dims=[7], question_loss_weight=0.5)
    got.load_state_dict(loss.state_dict())
    torch.testing.assert_close(got(logits, batch, {"question": question}), expected)
    assert [type(m).__name__ for m in loss.question_branch] == ["Linear", "ReLU", "Linear"]
    assert isinstance(_loss(end_linear=False).question_head, nn.Identity)


def test_branch_trains_but_never_the_question_encoder():
    encoder, question, logits, batch = _case()
    loss = _loss()
    loss(logits, batch, {"question": question}).backward()
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert logits.grad.abs().sum() > 0
    assert encoder.weight.grad is None  # the branch reads a detached question representation


def test_evaluation_scores_the_main_logits_alone():
    encoder, question, logits, batch = _case()
    loss = _loss().eval()
    torch.testing.assert_close(
        loss(logits, batch, {"question": question}), soft_cross_entropy(logits, batch.targets)
    )


def test_bad_options_and_missing_inputs_fail_clearly():
    with pytest.raises(ConfigError, match="loss.options.variant: 'orignal' is not one of"):
        load_experiment("default", ["loss.name=rubi", "loss.options.variant=orignal"])
    with pytest.raises(ConfigError, match="hidden_dims must be positive"):
        load_experiment("default", ["loss.name=rubi", "loss.options.hidden_dims=[0]"])
    with pytest.raises(ConfigError, match="question_loss_weight: must be >= 0.0"):
        load_experiment("default", ["loss.name=rubi", "loss.options.question_loss_weight=-1"])
    loss = registry.build("loss", "rubi", {"variant": "original"})
    with pytest.raises(ValueError, match=r"needs \['question_dim'\]"):
        loss.setup(LossContext(3))
    _, _, logits, batch = _case()
    with pytest.raises(KeyError, match="needs extras\\['question'\\]"):
        _loss()(logits, batch, {"pooled": torch.zeros(4, 2)})


def test_mcan_question_extras_leave_the_logits_unchanged(easy_vqa_batch):
    grid = {"visual_input": "grid", "grid_channels": [8, 8, 16, 16], "grid_cells": 16}
    model = registry.build("model", "mcan_tiny", grid, vocab_size=64, num_answers=13).eval()
    batch = easy_vqa_batch
    with torch.no_grad():
        plain = model(batch)
        logits, extras = model(batch, return_extras=True)
    assert torch.equal(plain, logits)
    assert extras["question"].shape == (len(batch), model.question_dim)


def test_a_real_run_with_the_original_rubi(tmp_path, tiny_run):
    cfg, raw = load_experiment(
        "default", [*tiny_run, "data.options.split=cp", "loss.name=rubi", "trainer.max_epochs=1",
                    "loss.options.variant=original", f"output_dir={tmp_path}"],
    )  # fmt: skip
    results = run_experiment(cfg, raw)
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    state = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert "loss_fn.question_branch.0.weight" in state["state_dict"]
    assert "loss_fn.question_head.weight" in state["state_dict"]
