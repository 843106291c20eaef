"""Compression callbacks in someone else's Lightning project laid out as the README's example:
``self.model = BertModel(cfg)`` with the classifier ``self.head`` outside it."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from vlcompress.callbacks import SlimmableTraining, StructuredPruning


class TextClassifier(L.LightningModule):
    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)  # fmt: skip
        self.model = model if model is not None else BertModel(cfg)
        self.head = nn.Linear(32, 2)

    def training_step(self, batch, batch_idx):
        ids, labels = batch
        pooled = self.model(input_ids=ids).last_hidden_state[:, 0]
        return nn.functional.cross_entropy(self.head(pooled), labels)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def head_logits(pl_module, output):
    return pl_module.head(output.last_hidden_state[:, 0])


def fit(task: L.LightningModule, callback, steps: int = 3) -> L.Trainer:
    ids = torch.randint(1, 100, (48, 10), generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.DataLoader(list(zip(ids, ids[:, 0] % 2)), batch_size=16)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], logger=False, accelerator="cpu",
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(task, data)
    return trainer


SPACE = [[0.25, 0.5], [0.5, 1], [1, 1]]


def test_structured_pruning_defaults_say_nothing_to_prune():
    with pytest.raises(ValueError, match=r"StructuredPruning: nothing to prune: heads=0.0 and "):
        fit(TextClassifier(), StructuredPruning())


def test_slimmable_without_logits_fn_is_refused_at_setup_with_the_fix():
    task = TextClassifier()
    before = {k: v.clone() for k, v in task.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"BertModel returns hidden states, not logits.*logits_fn="
    ):
        fit(task, SlimmableTraining(space=SPACE, seed=0))
    after = task.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # not a single step taken


def test_slimmable_with_an_outside_head_and_ground_truth_only():
    task = TextClassifier()
    head = task.head.weight.detach().clone()
    cb = SlimmableTraining(space=SPACE, distill="none", gt_weight=1.0, sample=1, seed=0)
    fit(task, cb)  # was: "mat1 and mat2 shapes cannot be multiplied"
    assert cb.steps == 3 and not torch.equal(task.head.weight, head)
    assert type(task.model.encoder.layer[0].attention.self.query) is nn.Linear  # plain again


def test_slimmable_distils_in_place_through_logits_fn():
    task = TextClassifier()
    seen: list[tuple[int, ...]] = []

    def logits(pl_module, output):
        seen.append(tuple(output.last_hidden_state.shape))
        return head_logits(pl_module, output)

    cb = SlimmableTraining(space=SPACE, distill="inplace", sample=1, logits_fn=logits, seed=0)
    fit(task, cb, steps=2)
    assert cb.steps == 2
    assert len(seen) == 2 * 3 and all(s[-1] == 32 for s in seen)  # every width, padded


def test_vilt_is_refused_width_slimming_at_setup_and_depth_is_fine():
    from transformers import ViltConfig, ViltModel

    vilt = ViltModel(ViltConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64, image_size=32,
                                patch_size=16))  # fmt: skip
    with pytest.raises(ValueError, match=r"ViltModel cannot be width-slimmed.*depth only"):
        fit(TextClassifier(vilt), SlimmableTraining(distill="none", gt_weight=1.0, seed=0))
    cb = SlimmableTraining(space=[[1, 0.5], [1, 1]], distill="none", gt_weight=1.0, seed=0)
    cb.setup(type("T", (), {"world_size": 1, "global_rank": 0})(), TextClassifier(vilt), "fit")
    assert cb.slim is not None and cb.slim.rules  # depth slimming attached
