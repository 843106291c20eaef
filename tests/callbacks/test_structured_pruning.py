"""StructuredPruning on a tiny BERT: heads and neurons by magnitude and first-order scores,
exact resume, and physical removal that computes what the masked model computed."""

from __future__ import annotations

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import LightningToy, trainer_kwargs

from vlcompress.callbacks import StructuredPruning


def _fit(tmp_path, cb, epochs, ckpt=None, save=None, model=None):
    model = model or LightningToy()
    trainer = lp.Trainer(**trainer_kwargs(tmp_path, max_epochs=epochs), callbacks=[cb])
    trainer.fit(model, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return model, cb


def test_magnitude_removes_the_weakest_heads_and_neurons(tmp_path):
    model, cb = _fit(tmp_path, StructuredPruning(heads=0.5, neurons=0.5, seed=0), 1)
    rep = cb.report()
    assert rep["removed"]["heads/language"]["fraction"] == 0.5
    assert rep["removed"]["ffns/language"]["fraction"] == 0.5
    initial = LightningToy().model  # the toy seeds itself: the weights the decision saw
    for ffn in cb.anatomy.ffns:
        gate = cb.gates[f"ffn:{ffn.name}"].detach() > 0
        up = initial.get_submodule(ffn.up).weight.detach()
        down = initial.get_submodule(ffn.down).weight.detach()
        norms = (up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt()
        assert int(gate.sum()) == ffn.inner_dim // 2
        assert norms[gate].min() >= norms[~gate].max()


def test_first_order_importance_and_exact_resume(tmp_path):
    kw = dict(heads=0.5, neurons=0.25, importance="first_order", schedule="linear",
              start_step=2, end_step=5, every=3, seed=0)  # fmt: skip
    full, cb_full = _fit(tmp_path / "a", StructuredPruning(**kw), 3)
    ckpt = tmp_path / "mid.ckpt"
    _fit(tmp_path / "b", StructuredPruning(**kw), 1, save=ckpt)
    res, cb_res = _fit(tmp_path / "b", StructuredPruning(**kw), 3, ckpt=str(ckpt))
    assert cb_full.done == cb_res.done == [2, 5]
    for k in cb_full.gates:
        assert torch.equal(cb_full.gates[k].detach(), cb_res.gates[k].detach())
    for (n, a), b in zip(full.state_dict().items(), res.state_dict().values()):
        assert torch.equal(a, b), n
    assert cb_full.report()["removed"]["heads/language"]["fraction"] == 0.5
    with pytest.raises(ValueError, match="start_step >= 1"):
        StructuredPruning(heads=0.5, importance="first_order")


def test_make_permanent_shrinks_the_model_and_keeps_its_outputs(tmp_path):
    x = torch.randint(0, 50, (3, 8))
    seen = {}

    class Probe(lp.Callback):  # the masked model, while the gates are on it
        def on_train_end(self, trainer, pl_module):
            with torch.no_grad():
                seen["masked"] = pl_module.model(input_ids=x).last_hidden_state

    model = LightningToy()
    cb = StructuredPruning(heads=0.5, neurons=0.5, seed=0)
    trainer = lp.Trainer(**trainer_kwargs(tmp_path, max_epochs=1), callbacks=[cb, Probe()])
    trainer.fit(model)
    model.eval()
    with torch.no_grad():  # after fit the gates are off: the user's plain model again
        plain = model.model(input_ids=x).last_hidden_state
    masked = seen["masked"]
    assert not torch.allclose(masked, plain, atol=1e-3)
    before = sum(p.numel() for p in model.model.parameters())
    kept = cb.make_permanent()
    after = sum(p.numel() for p in model.model.parameters())
    with torch.no_grad():
        reduced = model.model(input_ids=x).last_hidden_state
    assert torch.allclose(masked, reduced, atol=1e-5)
    assert after < before and cb.events[-1]["parameters_after"] == after
    assert all(len(v) == 1 for k, v in kept.items() if k.startswith("head:"))  # 2 heads -> 1
    assert cb.anatomy.attentions[0].num_heads == 1
