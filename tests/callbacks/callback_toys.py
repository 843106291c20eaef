"""Toy pieces for the callback tests: a tiny BERT LightningModule for each Lightning package and
a small concrete :class:`CompressionCallback` (module-level, so DDP spawn can pickle them)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as lp
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vlcompress.callbacks import CompressionCallback

STEPS_PER_EPOCH = 3


def tiny_bert() -> nn.Module:
    """A 2-layer, 2-head BERT with hidden size 16 (no dropout: runs are exactly repeatable)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config, add_pooling_layer=False)


class _ToyTask:
    """Classify random token sequences into 3 classes with a tiny BERT under ``self.model``.

    Args:
        nan_at_step: make the training loss NaN at this global step (``None``: never).
        attr: attribute name that holds the BERT (``"model"`` is what callbacks look for).
    """

    def __init__(self, nan_at_step: int | None = None, attr: str = "model") -> None:
        super().__init__()
        torch.manual_seed(0)
        setattr(self, attr, tiny_bert())
        self.bert_attr = attr
        self.task_head = nn.Linear(16, 3)
        self.nan_at_step = nan_at_step
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randint(0, 50, (4 * STEPS_PER_EPOCH, 8), generator=g),
            torch.randint(0, 3, (4 * STEPS_PER_EPOCH,), generator=g),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, labels = batch
        hidden = getattr(self, self.bert_attr)(input_ids=ids).last_hidden_state
        loss = nn.functional.cross_entropy(self.task_head(hidden[:, 0]), labels)
        if self.nan_at_step is not None and self.global_step == self.nan_at_step:
            loss = loss * math.nan
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4, shuffle=False)


class LightningToy(_ToyTask, lp.LightningModule):
    """The toy task as a ``lightning.pytorch`` LightningModule."""


try:
    import pytorch_lightning as pl
except ImportError:  # the dev extra brings it; tests that need it skip without it
    pl = None
else:

    class PLToy(_ToyTask, pl.LightningModule):
        """The toy task as a ``pytorch_lightning`` LightningModule."""


def trainer_kwargs(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Quiet, CPU-only Trainer arguments (the same for both packages)."""
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    kw.update(overrides)
    return kw


class RandomHeadDropper(CompressionCallback):
    """Switch off a random ``fraction`` of the attention heads; draw again every
    ``every_n_steps`` optimiser steps.

    The first choice (at train start) uses a deliberately *rank-dependent* generator, as a
    careless implementation would; :meth:`decide` makes rank 0's choice everyone's. The later
    draws use :meth:`generator`, which is identical on all ranks without any communication.
    With ``record_dir`` every rank writes what it decided, what it would have decided alone,
    and its generator draw to ``rank<k>.json``.

    Args:
        fraction: share of the heads switched off, in [0, 1].
        every_n_steps: draw again after every n optimiser steps (0: never).
        seed, name: as in :class:`CompressionCallback`.
        record_dir: folder for the per-rank records (``None``: no records).
    """

    def __init__(
        self,
        fraction: float = 0.5,
        every_n_steps: int = 0,
        seed: int | None = None,
        name: str | None = None,
        record_dir: str | None = None,
        model_attr: Any = None,
        patterns: Any = None,
    ) -> None:
        super().__init__(seed=seed, name=name, model_attr=model_attr, patterns=patterns)
        self.fraction = self.check_argument("fraction", fraction, float, low=0.0, high=1.0)
        self.every_n_steps = self.check_argument("every_n_steps", every_n_steps, int, low=0)
        self.record_dir = record_dir
        self.masks: dict[str, torch.Tensor] = {}
        self.history: list[list[Any]] = []
        self._handles: list[Any] = []

    # -------------------------------------------------------------- choosing heads
    def _heads(self) -> list[tuple[str, int]]:
        return [(a.name, h) for a in self.anatomy.attentions for h in range(a.num_heads)]

    def _pick(self, generator: torch.Generator) -> list[list[Any]]:
        heads = self._heads()
        order = torch.randperm(len(heads), generator=generator).tolist()
        n = round(self.fraction * len(heads))
        return sorted([list(heads[i]) for i in order[:n]])

    def _apply(self, dropped: list[list[Any]]) -> None:
        for h in self._handles:
            h.remove()
        masks = {a.name: torch.ones(a.num_heads) for a in self.anatomy.attentions}
        for attn, head in dropped:
            masks[attn][head] = 0.0
        self.masks = masks
        self._handles = self.anatomy.mask_heads(self.model, masks)

    def _local_pick(self) -> list[list[Any]]:
        """A rank-dependent choice: what each rank would do on its own."""
        return self._pick(torch.Generator().manual_seed(1000 + self.global_rank))

    # -------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self.masks:  # restored from a checkpoint: already applied in load_state
            return
        local = self._local_pick()
        dropped = self.decide(self._local_pick)
        self._apply(dropped)
        self.history.append([trainer.global_step, dropped])
        if self.record_dir is not None:
            record = {
                "rank": self.global_rank,
                "world_size": self.world_size,
                "seed": self.seed,
                "decided": dropped,
                "local": local,
                "generated": self._pick(self.generator(step=0, salt="record")),
            }
            path = Path(self.record_dir) / f"rank{self.global_rank}.json"
            path.write_text(json.dumps(record))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0:
            dropped = self._pick(self.generator(step))
            self._apply(dropped)
            self.history.append([step, dropped])

    # -------------------------------------------------------------- state and reports
    def state(self) -> dict[str, Any]:
        return {"masks": {k: v.clone() for k, v in self.masks.items()}, "history": self.history}

    def load_state(self, state: dict[str, Any]) -> None:
        self.history = [list(h) for h in state["history"]]
        dropped = [[a, h] for a, m in state["masks"].items() for h in range(len(m)) if m[h] == 0]
        self._apply(dropped)

    def report(self) -> dict[str, Any]:
        off = sum(int((m == 0).sum()) for m in self.masks.values())
        return {"heads_off": off, "draws": len(self.history)}

    def report_rows(self) -> list[tuple[str, str]]:
        return [("heads switched off", str(self.report()["heads_off"]))]


class MaskRecorder(lp.Callback):
    """Write, per rank, a digest of every pruning callback's masks (and scores) at train end."""

    def __init__(self, record_dir: str) -> None:
        self.record_dir = record_dir

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        from vlcompress.callbacks.pruning_base import PruningCallback, masks_digest

        record = {}
        for cb in trainer.callbacks:
            if isinstance(cb, PruningCallback):
                entry = {"masks": masks_digest(cb.masks), "n": len(cb.masks)}
                if getattr(cb, "scores", None):
                    entry["scores"] = sum(float(s.double().sum()) for s in cb.scores.values())
                record[cb.state_key] = entry
        weights = sum(float(p.double().abs().sum()) for p in pl_module.parameters())
        record["weights"] = weights
        path = Path(self.record_dir) / f"masks{trainer.global_rank}.json"
        path.write_text(json.dumps(record))


class Adapter(nn.Module):
    """``x + up(relu(down(x)))``: the shape of the adapters architecture skipping trains."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class AdapterDistiller(CompressionCallback):
    """Every way a callback changes training, as the next two methods will: an owned adapter
    attached after the first layer (read-out ``readout_in``), an owned projection head reading
    the hidden state of ``readout_out``, and an extra loss term added to the training step
    (``weight`` x the squared distance of the projected [CLS] state to a fixed target).

    Owned weights start from the callback's generator (the same in every run), so two runs
    differ only if training or resuming differs.
    """

    def __init__(
        self,
        dim: int = 16,
        weight: float = 0.5,
        readout_in: str = "encoder.layer.0",
        readout_out: str = "encoder.layer.1",
        seed: int | None = 0,
    ) -> None:
        super().__init__(seed=seed)
        self.dim, self.weight = dim, weight
        self.readout_in, self.readout_out = readout_in, readout_out
        self.hidden: dict[str, torch.Tensor] = {}
        self.extra_losses: list[float] = []

    def _fresh(self, module: nn.Module, salt: str) -> nn.Module:
        g = self.generator(0, salt=salt)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return module

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        adapter = self.own_module("adapter", self._fresh(Adapter(self.dim, 4), "adapter"))
        self.own_module("projection", self._fresh(nn.Linear(self.dim, 8), "projection"))
        self.attach_module(self.readout_in, adapter)
        self.hidden = self.capture_hidden([self.readout_out])
        self.wrap_training_step(pl_module, self._with_extra_loss)

    def _with_extra_loss(self, step: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = step(*args, **kwargs)
        target = torch.randn(8, generator=self.generator(0, salt="target"))
        projected = self.owned["projection"](self.hidden[self.readout_out][:, 0])
        extra = (projected - target.to(projected.device)).pow(2).mean()
        mean = extra.detach()  # the state is rank 0's in the checkpoint: keep it rank-identical
        if self.world_size > 1:
            mean = self._trainer.strategy.reduce(mean, reduce_op="mean")
        self.extra_losses.append(float(mean))
        return loss + self.weight * extra

    def configure_owned_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=0.01)

    def state(self) -> dict[str, Any]:
        return {"extra_losses": list(self.extra_losses)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.extra_losses = [float(x) for x in state.get("extra_losses", [])]
