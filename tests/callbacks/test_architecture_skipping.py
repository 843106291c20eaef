"""ArchitectureSkipping (seed 002, DAS): a frozen backbone with adapters, the bandit search on
held-out batches, the switch to the skipping phase in the same run, and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as lp
import pytest
import torch
from callback_toys import trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vlcompress.callbacks import ArchitectureSkipping
from vlcompress.registry import get

STEPS = 4  # optimiser steps per epoch


def _bert(layers: int = 4) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config)


class Toy(lp.LightningModule):
    """Classify token sequences (the class is the first token's parity) with a tiny BERT."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = _bert()
        self.task_head = nn.Linear(16, 2)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 50, (6 * STEPS, 8), generator=g)
        self.train_data = TensorDataset(ids[: 4 * STEPS], ids[: 4 * STEPS, 0] % 2)
        self.val_data = TensorDataset(ids[4 * STEPS :], ids[4 * STEPS :, 0] % 2)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        pooled = self.model(input_ids=ids).pooler_output
        loss = nn.functional.cross_entropy(self.task_head(pooled), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        ids, labels = batch
        loss = nn.functional.cross_entropy(
            self.task_head(self.model(input_ids=ids).pooler_output), labels
        )
        self.log("val/loss", loss)

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def test_dataloader(self):
        return self.val_dataloader()

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=1e-2)

    def train_dataloader(self):
        return DataLoader(self.train_data, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.val_data, batch_size=4)


class Watch(lp.Callback):
    """Which encoder layers really ran in each training step; weights at each epoch start."""

    def __init__(self) -> None:
        self.ran: dict[int, set[int]] = {}
        self.head: dict[int, torch.Tensor] = {}
        self.word: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer, pl_module):
        if self.ran:
            return
        for i, layer in enumerate(pl_module.model.encoder.layer):
            layer.attention.register_forward_hook(lambda m, a, o, i=i: self._ran(trainer, m, i))

    def _ran(self, trainer, module, i):
        # training forwards only: probes run in eval mode, and a skipped layer's first call
        # runs it once without gradient to learn its output structure
        if trainer.testing:
            self.ran.setdefault("test", set()).add(i)
        elif module.training and torch.is_grad_enabled():
            self.ran.setdefault(trainer.global_step, set()).add(i)

    def on_train_epoch_start(self, trainer, pl_module):
        self.head[trainer.current_epoch] = pl_module.task_head.weight.detach().clone()
        self.word[trainer.current_epoch] = (
            pl_module.model.embeddings.word_embeddings.weight.detach().clone()
        )


def _fit(tmp_path, cb, epochs=4, ckpt_path=None, extra=(), **kw):
    module = Toy()
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=epochs, num_sanity_val_steps=0, **kw),
        callbacks=[cb, *extra],
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, trainer


def _callback(**kw):
    args = dict(skip=1, search_epochs=2, warmup_epochs=1, interval=1, probes=3,
                bottleneck=4, skip_bottleneck=4, seed=0)  # fmt: skip
    args.update(kw)
    return ArchitectureSkipping(**args)


def test_search_then_skipping_in_one_run(tmp_path):
    cb, watch = _callback(), Watch()
    module, _ = _fit(tmp_path, cb, extra=[watch])
    rep = cb.report()
    arms = [f"encoder.layer.{i}" for i in range(4)]
    assert rep["arms"] == arms and rep["phase"] == "skipping"
    # the gates moved once per optimiser step of epoch 1 (after the warm-up epoch)
    assert rep["gate_updates"] == STEPS and len(rep["gate_history"]) == STEPS + 1
    assert rep["chosen"] == cb.gates.top() and len(rep["chosen"]) == 1
    chosen = int(rep["chosen"][0].rsplit(".", 1)[1])
    # search: each training step ran 3 of the 4 layers; skipping: never the chosen one
    for step in range(2 * STEPS):
        assert len(watch.ran[step]) == 3, step
    for step in range(2 * STEPS, 4 * STEPS):
        assert watch.ran[step] == set(range(4)) - {chosen}, step
    # the backbone stayed frozen, the head trained; restart: the head went back at the switch
    assert torch.equal(watch.word[3], watch.word[0])
    assert not torch.equal(watch.head[1], watch.head[0])
    assert torch.equal(watch.head[2], watch.head[0])
    assert not torch.equal(watch.head[3], watch.head[2])
    # after fit the user's model is as it was: trainable again, no layer skipped
    assert all(p.requires_grad for p in module.model.parameters())
    assert cb.anatomy.skipped(module.model) == []
    assert rep["trainable_parameters"]["adapters"] > 0
    parallel = 4 * 2 * (2 * 16 + 16 * 4 + 4 + 4 * 16 + 16)  # 4 layers x (attention, FFN)
    skip_one = 2 * 16 + 16 * 4 + 4 + 4 * 16 + 16
    assert rep["trainable_parameters"]["adapters"] == parallel + skip_one
    head, pooler, types = 16 * 2 + 2, 16 * 16 + 16, 2 * 16
    assert rep["trainable_parameters"]["model"] == head + pooler + types
    # MACs per example: skipping a layer saves what that layer (minus its adapter) costs
    costs = rep["macs_per_example"]
    saved = costs["saved_by_arm"]
    assert costs["full"] - costs["skipped"] == saved[rep["chosen"][0]] > 0
    assert len(set(saved.values())) == 1  # four identical layers save the same
    assert (tmp_path / "skipping_gates.png").stat().st_size > 1000


def test_continue_keeps_the_search_weights(tmp_path):
    cb, watch = _callback(restart="continue"), Watch()
    _fit(tmp_path, cb, extra=[watch])
    assert not torch.equal(watch.head[2], watch.head[0])


@pytest.mark.parametrize("epoch", [0, 1])
def test_a_killed_search_resumes_exactly(tmp_path, epoch):
    full = _callback()
    full_module, _ = _fit(tmp_path / "full", full)
    ckpt = lp.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1)
    _fit(tmp_path / "a", _callback(), epochs=epoch + 1, extra=[ckpt], enable_checkpointing=True)
    saved = sorted((tmp_path / "ck").glob(f"epoch={epoch}-*.ckpt"))
    assert len(saved) == 1
    resumed = _callback()  # killed after the warm-up (0) or with the search done (1)
    module, _ = _fit(tmp_path / "b", resumed, ckpt_path=str(saved[0]), enable_checkpointing=True)
    assert resumed.report()["gate_history"] == full.report()["gate_history"]
    assert resumed.chosen == full.chosen and resumed.probe_log == full.probe_log
    # the restart at the switch used the checkpointed initial weights: the same end
    torch.testing.assert_close(
        module.task_head.weight, full_module.task_head.weight, rtol=0, atol=0
    )
    for a, b in zip(resumed.owned.parameters(), full.owned.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_registered_and_checks():
    assert get("callback", "architecture_skipping").builder is ArchitectureSkipping
    with pytest.raises(ValueError, match="warmup_epochs"):
        ArchitectureSkipping(search_epochs=1, warmup_epochs=1)
    with pytest.raises(ValueError):
        ArchitectureSkipping(probes=1)


def test_preflight_names_unknown_arms_and_too_many_skips():
    cb = ArchitectureSkipping(skip=4, arms=["encoder.layer.0", "nope"])
    problems = cb.preflight(_bert())
    assert any("nope" in p for p in problems)
    assert any("only 2 arms" in p for p in problems)


class GateRecorder(lp.Callback):
    """Per rank: the gates' history, the chosen set, a checksum of the weights."""

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, ArchitectureSkipping))
        record = {
            "history": cb.gates.history,
            "chosen": cb.chosen,
            "weights": sum(float(p.double().abs().sum()) for p in pl_module.parameters()),
            "adapters": sum(float(p.double().abs().sum()) for p in cb.owned.parameters()),
        }
        Path(self.record_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def test_two_ddp_ranks_hold_the_same_gates(tmp_path):
    """Each rank scores the probes on its own validation shard; the losses are averaged, so
    both ranks move their gates alike and skip the same arm."""
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=3,
                         num_sanity_val_steps=0),
        callbacks=[_callback(), GateRecorder(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(Toy())
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    assert len(r0["history"]) > 1 and len(r0["chosen"]) == 1
    assert r0["history"][-1] != r0["history"][0]


def test_best_checkpoint_and_test_are_of_the_skipping_phase(tmp_path):
    cb, watch = _callback(), Watch()
    ckpt = lp.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", monitor="val/loss", mode="min")
    module, trainer = _fit(tmp_path, cb, extra=[watch, ckpt], enable_checkpointing=True)
    best = torch.load(ckpt.best_model_path, weights_only=False)
    assert best["epoch"] >= 2  # search_epochs = 2: a checkpoint of the skipping phase
    assert [p.name for p in (tmp_path / "ck").iterdir()] == [Path(ckpt.best_model_path).name]
    trainer.test(module, ckpt_path="best", verbose=False)
    chosen = int(cb.chosen[0].rsplit(".", 1)[1])
    assert watch.ran["test"] == set(range(4)) - {chosen}  # the test skips the chosen layer


def test_seed_compatible_scores_like_the_seeds_code(tmp_path):
    """Cadence in micro-batches, the same first batch, dropout on: 4 micro-batches of epoch 1
    with accumulate_grad_batches=2 give 2 optimiser steps; interval 1 probes after each
    micro-batch in the seed's way and after each optimiser step in ours."""
    seed = _callback(seed_compatible=True)
    _fit(tmp_path / "seed", seed, epochs=2, accumulate_grad_batches=2)
    ours = _callback()
    _fit(tmp_path / "ours", ours, epochs=2, accumulate_grad_batches=2)
    assert seed.gates.updates == STEPS and ours.gates.updates == STEPS // 2
    assert seed.reward_cursor == 0 and ours.reward_cursor == STEPS // 2
    with pytest.raises(TypeError):
        ArchitectureSkipping(seed_compatible="yes")


class AdapterWatch(lp.Callback):
    """The skip adapters' up-projections after every optimiser step."""

    def __init__(self) -> None:
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        cb = next(c for c in trainer.callbacks if isinstance(c, ArchitectureSkipping))
        self.after.append(
            {k: a.up.weight.detach().clone() for k, a in cb.owned["skip_adapters"].items()}
        )


def test_only_the_skipped_arms_adapter_moves(tmp_path):
    """Adam leaves an adapter that got no gradient alone (no momentum step): in each warm-up
    step only the skip adapter of the drawn arm changes."""
    from vlcompress.compress.skipping import SkipGates

    cb, watch = _callback(), AdapterWatch()
    _fit(tmp_path, cb, epochs=1, extra=[watch])  # the warm-up epoch: the gates stay at 0
    keys = [f"encoder/layer/{i}" for i in range(4)]
    for step in range(1, STEPS):
        drawn = SkipGates(cb.gates.arms, 1).draw(cb.generator(step, salt="train"))
        moved = [k for k in keys if not torch.equal(watch.after[step][k], watch.after[step - 1][k])]
        assert moved == [keys[i] for i in drawn], step


def test_adapters_only_and_the_control_choices(tmp_path):
    cb, watch = _callback(skip=0), Watch()
    module, trainer = _fit(tmp_path / "a", cb, extra=[watch])
    rep = cb.report()
    assert rep["phase"] == "adapters only" and rep["chosen"] == [] and cb.gates is None
    assert all(watch.ran[s] == set(range(4)) for s in range(4 * STEPS))  # nothing skipped
    assert torch.equal(watch.word[3], watch.word[0])  # frozen backbone
    assert not torch.equal(watch.head[2], watch.head[0])  # no restart: one phase
    parallel = 4 * 2 * (2 * 16 + 16 * 4 + 4 + 4 * 16 + 16)
    assert rep["trainable_parameters"]["adapters"] == parallel  # no skip adapters
    assert rep["macs_per_example"]["full"] == rep["macs_per_example"]["skipped"] > 0
    trained = [p.detach().clone() for p in cb.owned.parameters()]
    cb.setup(trainer, module, "test")  # a later stage sets up again: the adapters stay
    assert all(torch.equal(a, b) for a, b in zip(trained, cb.owned.parameters()))  # kept
    # a checkpoint of another skip is refused by name, before its weights load
    with pytest.raises(ValueError, match=r"skip=0; this run is configured for .* skip=1"):
        _callback(skip=1).load_state_dict({"state": cb.state()})
    top, bottom = _callback(skip=2), _callback(skip=2, choose="bottom")
    _fit(tmp_path / "t", top)
    _fit(tmp_path / "b", bottom)
    assert top.gates.gates.tolist() == bottom.gates.gates.tolist()  # the same search
    assert top.chosen == top.gates.top() and bottom.chosen == bottom.gates.bottom()
    assert bottom.report()["choose"] == "bottom"
    picks = set()
    for seed in range(6):
        r = _callback(skip=2, choose="random", seed=seed)
        _fit(tmp_path / f"r{seed}", r)
        assert len(set(r.chosen)) == 2 and set(r.chosen) <= set(r.gates.arms)
        picks.add(tuple(r.chosen))
    assert len(picks) > 1  # seeded, not fixed
    with pytest.raises(ValueError, match="choose"):
        ArchitectureSkipping(choose="best")


class NoisyToy(Toy):
    """Draws from the global RNG in every forward, as ViLT does (its patches are ordered by
    ``torch.multinomial``): the loss moves with the draw, the gradients do not."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 1e-3 * torch.rand(())


class DrawAt(lp.Callback):
    """Consumes the global RNG once before training step ``at`` (as a resumed run's new data
    iterator does)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at:
            torch.rand(7)


def test_probes_neither_depend_on_nor_consume_the_global_rng(tmp_path):
    histories, states = [], []
    for extra in ([], [DrawAt(STEPS + 1)]):
        cb = _callback()
        trainer = lp.Trainer(
            **trainer_kwargs(tmp_path, max_epochs=2, num_sanity_val_steps=0),
            callbacks=[cb, *extra],
        )
        torch.manual_seed(5)
        trainer.fit(NoisyToy())
        histories.append(cb.report()["gate_history"])
        states.append(torch.get_rng_state())
    assert len(histories[0]) == STEPS + 1
    assert histories[0] == histories[1]  # the extra draw did not move a single gate
    # probes leave the training stream alone: with fewer probes, the same RNG state at the end
    cb = _callback(interval=STEPS + 5)  # warm-up only, then one probe per search epoch
    trainer = lp.Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, num_sanity_val_steps=0), callbacks=[cb]
    )
    torch.manual_seed(5)
    trainer.fit(NoisyToy())
    assert torch.equal(torch.get_rng_state(), states[0])
