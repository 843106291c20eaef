"""Debiasing losses (LMH, PoE, LPF, RUBi): their definitions on hand-made cases, bias terms in
training only, LMH's gate and smoothing actually trained, and a real run with each."""

import pytest
import torch
import torch.nn.functional as F

from vlcompress import registry
from vlcompress.config import ConfigError, load_experiment
from vlcompress.data import VLBatch
from vlcompress.losses import LossContext, soft_cross_entropy, vqa_bce
from vlcompress.run import run_experiment


def _setup(name, prior, pooled_dim=4, **options):
    loss = registry.build("loss", name, options)
    loss.setup(LossContext(prior.shape[1], [str(i) for i in range(len(prior))], prior, pooled_dim))
    return loss.train()


def _batch(targets, types):
    ids = torch.ones(len(targets), 2, dtype=torch.long)
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.zeros(len(targets), 1, 1),
        targets=targets, question_type_id=torch.tensor(types),
    )  # fmt: skip


@pytest.fixture
def case():
    torch.manual_seed(0)
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.0]])
    return torch.randn(2, 3, requires_grad=True), _batch(targets, [0, 1])


def test_poe_with_an_uninformative_prior_is_bce(case):
    logits, batch = case
    loss = _setup("poe", torch.full((2, 3), 0.5))
    torch.testing.assert_close(loss(logits, batch, {}), vqa_bce(logits, batch.targets))


def test_poe_follows_the_prior(case):
    logits, batch = case
    prior = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.7, 0.4]])
    b = prior[batch.question_type_id]
    p = torch.sigmoid(logits) * b / (torch.sigmoid(logits) * b + torch.sigmoid(-logits) * (1 - b))
    expected = F.binary_cross_entropy(p, batch.targets, reduction="sum") / 2
    torch.testing.assert_close(_setup("poe", prior)(logits, batch, {}), expected)


def test_lpf_weights_each_question_by_its_prior(case):
    logits, batch = case
    prior = torch.tensor([[0.6, 0.2, 0.2], [0.1, 0.8, 0.1]])
    gamma0 = _setup("lpf", prior, gamma=0.0)(logits, batch, {})
    torch.testing.assert_close(gamma0, soft_cross_entropy(logits, batch.targets))
    dist = batch.targets / batch.targets.sum(-1, keepdim=True)
    p_gt = (dist * prior).sum(-1)  # question 0: (1 x .6 + .3 x .2) / 1.3; question 1: .8
    ce = -(dist * logits.log_softmax(-1)).sum(-1)
    expected = ((1 - p_gt) ** 5 * ce).mean()
    torch.testing.assert_close(_setup("lpf", prior)(logits, batch, {}), expected)


def test_rubi_masks_the_logits_with_the_prior(case):
    logits, batch = case
    prior = torch.tensor([[3.0, -3.0, 0.0], [0.0, 1.0, -1.0]])
    masked = logits * torch.sigmoid(prior[batch.question_type_id])
    got = _setup("rubi", prior)(logits, batch, {})
    torch.testing.assert_close(got, soft_cross_entropy(masked, batch.targets))


def test_lmh_gate_and_smoothing_get_gradients_and_eval_is_plain_bce(case):
    logits, batch = case
    prior = torch.tensor([[0.9, 0.05, 0.5], [0.2, 0.7, 0.4]])
    loss = _setup("lmh", prior)
    pooled = torch.randn(2, 4)
    value = loss(logits, batch, {"pooled": pooled})
    value.backward()
    assert loss.gate.weight.grad.abs().sum() > 0 and loss.smooth.grad.abs() > 0
    assert not torch.allclose(value, vqa_bce(logits, batch.targets))
    loss.eval()
    torch.testing.assert_close(
        loss(logits, batch, {"pooled": pooled}), vqa_bce(logits, batch.targets)
    )
    # A gate that is switched off (g -> 0) leaves BCE, plus the entropy of a flat bias: ln 2.
    loss.train()
    with torch.no_grad():
        loss.gate.weight.zero_()
        loss.gate.bias.fill_(-50.0)
    off = loss(logits, batch, {"pooled": pooled})
    torch.testing.assert_close(
        off, vqa_bce(logits, batch.targets) + 0.36 * torch.log(torch.tensor(2.0))
    )


def test_options_are_validated():
    with pytest.raises(ConfigError) as e:
        load_experiment("default", ["loss.name=lpf", "loss.options.gamma=-1"])
    assert "loss.options.gamma: must be >= 0.0, got -1" in str(e.value)
    with pytest.raises(ConfigError, match="loss.options.entropy_weigth: unknown key; did you mean"):
        load_experiment("default", ["loss.name=lmh", "loss.options.entropy_weigth=1"])


@pytest.mark.parametrize("name", ["lmh", "poe", "lpf", "rubi"])
def test_a_real_run_with_each_debiasing_loss(name, tmp_path, tiny_run):
    cfg, raw = load_experiment(
        "default", [*tiny_run, "data.options.split=cp", f"loss.name={name}", "trainer.max_epochs=1",
                    f"output_dir={tmp_path}"],
    )  # fmt: skip
    results = run_experiment(cfg, raw)
    assert 0.0 <= results["test"]["accuracy"] <= 1.0
    state = torch.load(tmp_path / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    if name == "lmh":  # the gate and the smoothing were trained (the seed's code never did)
        assert state["state_dict"]["loss_fn.smooth"].item() != -1.0
        assert "loss_fn.gate.weight" in state["state_dict"]
