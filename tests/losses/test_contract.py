"""The loss contract: bce/ce unchanged, and a loss's own parameters are trained by the task."""

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress import registry
from vlcompress.data import VLBatch
from vlcompress.losses import LossContext, VQALoss
from vlcompress.tasks import VQATask


def _batch(b=4, a=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 9, (b, 3), generator=g)
    return VLBatch(
        text_ids=ids, text_mask=ids != 0, visual=torch.randn(b, 2, 4, generator=g),
        targets=(torch.rand(b, a, generator=g) * 3).floor() * 0.3,
        question_type_id=torch.tensor([0, 1, 0, 1]),
    )  # fmt: skip


def test_bce_and_ce_give_the_same_numbers_as_before():
    batch, logits = _batch(), torch.randn(4, 6)
    t = batch.targets
    bce = registry.build("loss", "bce")(logits, batch, {})
    by_hand = -(t * F.logsigmoid(logits) + (1 - t) * F.logsigmoid(-logits)).sum() / 4
    torch.testing.assert_close(bce, by_hand)
    ce = registry.build("loss", "ce")(logits, batch, {})
    dist = t / t.sum(-1, keepdim=True).clamp(min=1e-12)
    torch.testing.assert_close(ce, -(dist * logits.log_softmax(-1)).sum(-1).mean())


class PriorGate(VQALoss):
    """A toy debiasing loss: BCE of logits + g * log prior, g a trained gate (LMH-like)."""

    requires = ("question_type_prior", "pooled_dim")

    def setup(self, context):
        super().setup(context)  # keeps the prior as a buffer: it moves with the module
        self.gate = nn.Linear(context.pooled_dim, 1)

    def forward(self, logits, batch, extras):
        if self.training:
            g = F.softplus(self.gate(extras["pooled"]))
            prior = self.question_type_prior.clamp(min=1e-3)
            logits = logits + g * prior[batch.question_type_id].log()
        return F.binary_cross_entropy_with_logits(logits, batch.targets)


class Pooled(nn.Module):
    pooled_dim = 3
    returns_extras = True

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 3)
        self.out = nn.Linear(3, 6)

    def forward(self, batch, return_extras=False):
        pooled = self.f(batch.visual.mean(1))
        return (self.out(pooled), {"pooled": pooled}) if return_extras else self.out(pooled)


def test_loss_parameters_are_optimised_and_bias_only_in_training():
    torch.manual_seed(0)
    prior = torch.rand(2, 6)
    task = VQATask(Pooled(), [str(i) for i in range(6)], loss=PriorGate(),
                   question_types=["a", "b"], question_type_prior=prior,
                   optimizer={"name": "sgd", "lr": 0.5})  # fmt: skip
    opt = task.configure_optimizers()
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(task.loss_fn.gate.weight) in params
    assert "question_type_prior" in dict(task.loss_fn.named_buffers())
    assert not any("question_type_prior" in k for k in task.state_dict())  # not checkpointed
    before = task.loss_fn.gate.weight.detach().clone()
    batch = _batch()
    task.train()
    seen = []
    task.model.register_forward_hook(lambda m, a, kw, out: seen.append(kw), with_kwargs=True)
    logits, extras = task.forward_extras(batch)
    assert seen == [{"return_extras": True}]  # through nn.Module.__call__: hooks fire
    loss = task.loss_fn(logits, batch, extras)
    loss.backward()
    opt.step()
    assert not torch.equal(before, task.loss_fn.gate.weight)
    task.eval()  # evaluation: the main logits alone
    logits, extras = task.forward_extras(batch)
    torch.testing.assert_close(
        task.loss_fn(logits, batch, extras),
        F.binary_cross_entropy_with_logits(logits, batch.targets),
    )


def test_a_loss_that_needs_the_prior_says_so():
    import pytest

    with pytest.raises(ValueError, match=r"PriorGate loss needs \['question_type_prior'\]"):
        PriorGate().setup(LossContext(num_answers=6, pooled_dim=3))
