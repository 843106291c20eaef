"""``VQATask``: one LightningModule around any base VQA model."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric

from vlcompress import registry
from vlcompress.config.validate import lr_scale_problems
from vlcompress.data.batch import VLBatch
from vlcompress.losses.base import LossContext, VQALoss
from vlcompress.metrics import ANSWER_TYPES, VQAAccuracy
from vlcompress.models import contract

log = logging.getLogger(__name__)


def param_groups(module: nn.Module, lr: float, lr_scale: dict[str, float]) -> list[dict[str, Any]]:
    """Trainable parameters in optimiser groups: one per ``lr_scale`` pattern (parameter-name
    regex -> learning-rate multiplier; the first matching pattern wins), one for the rest.

    Raises:
        ValueError: a pattern that is not a regex, a multiplier that is not positive, or a
            pattern that wins no parameter (matches none, or only ones an earlier pattern took:
            a typo would silently train everything at the base rate). A pattern that matches
            only frozen parameters (a callback such as mask training froze them) gets no group,
            with a log line.
    """
    import re

    problems = lr_scale_problems(lr_scale)
    if problems:
        raise ValueError("; ".join(problems))
    compiled = [(p, re.compile(p), float(s)) for p, s in lr_scale.items()]
    groups: dict[str, list[nn.Parameter]] = {p: [] for p, _, _ in compiled}
    won: dict[str, int] = {p: 0 for p, _, _ in compiled}  # parameters won, frozen ones too
    rest: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        hit = next((p for p, rx, _ in compiled if rx.search(name)), None)
        if hit is not None:
            won[hit] += 1
        if param.requires_grad:
            (groups[hit] if hit is not None else rest).append(param)
    typos = [p for p, n in won.items() if n == 0]
    if typos:
        names = [n for n, _ in module.named_parameters()][:5]
        raise ValueError(
            f"optim.lr_scale: {typos} match no parameter, or only parameters an earlier pattern "
            f"already took (names look like {names}); fix the patterns (Python regexes searched "
            "in the parameter names; the first matching pattern wins)."
        )
    frozen = [p for p in groups if not groups[p]]
    if frozen:  # e.g. mask training freezes the weights: nothing of theirs to scale
        log.info("optim.lr_scale: %s match only frozen parameters; no group for them", frozen)
    out = [{"params": groups[p], "lr": lr * s, "name": p} for p, _, s in compiled if groups[p]]
    return [*out, {"params": rest, "lr": lr, "name": "default"}] if rest else out


class VQATask(L.LightningModule):
    """Train and evaluate a VQA model: soft-score targets, a loss, the official accuracy.

    Args:
        model: a :class:`~vlcompress.models.contract.VQAModel` (every registered model), or any
            module mapping a :class:`VLBatch` to answer logits ``(B, len(answers))``; what such
            a module does not declare takes the defaults of :mod:`vlcompress.models.contract`.
        answers: answer strings in the model's output order.
        loss: a registered loss name (``bce``, ``ce``, ...) or a :class:`VQALoss`; it is set up
            with the answer count, the question-type prior and the model's ``pooled_dim`` and
            ``question_dim``, and
            its parameters (if any) are trained with the model.
        optimizer: ``{"name": adam|adamw|sgd, "lr", "weight_decay", "betas", "momentum"}``.
        scheduler: ``{"name": none|cosine|warmup_cosine|step, "warmup_steps", "milestones",
            "gamma"}`` (milestones in epochs).
        answer_types, question_types: categories of the accuracy breakdown.
        question_type_prior: ``(len(question_types), len(answers))`` train-split prior from the
            data module (debiasing losses need it).

    The model maps a batch to logits; a model with ``returns_extras = True`` also accepts
    ``model(batch, return_extras=True) -> (logits, extras)``, and the extras (``pooled``,
    ``question``: :data:`~vlcompress.models.contract.EXTRAS`) reach the loss. Either way the
    model is called through ``nn.Module.__call__`` (its hooks fire, a compiled model stays
    compiled).

    Attributes:
        init_checkpoint: the previous stage's checkpoint when the run started from one
            (``init_from``; see :mod:`vlcompress.utils.init_from`), else ``None``. Its
            ``"callbacks"`` entry holds the callbacks' saved state (a pruning callback may take
            a previous stage's masks from it in ``setup``); optimiser states are dropped.

    Checkpoints also store the answer list (``checkpoint["vlcompress_answers"]``) so that a
    later stage can check that it predicts the same answers.

    Raises:
        ValueError: for an unknown optimiser or scheduler name, or a loss whose needs the data
            or model cannot meet.
        vlcompress.registry.UnknownComponentError: for an unknown loss name.
    """

    init_checkpoint: dict[str, Any] | None = None

    def __init__(
        self,
        model: nn.Module,
        answers: Sequence[str],
        loss: str | VQALoss = "bce",
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        answer_types: Sequence[str] = ANSWER_TYPES,
        question_types: Sequence[str] | None = None,
        question_type_prior: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.answers = list(answers)
        self.loss_fn: VQALoss = registry.build("loss", loss) if isinstance(loss, str) else loss
        self.loss_fn.setup(
            LossContext(
                num_answers=len(self.answers),
                question_types=list(question_types or []),
                question_type_prior=question_type_prior,
                pooled_dim=contract.pooled_dim(model),
                question_dim=contract.question_dim(model),
            )
        )
        self.optimizer_cfg = {"name": "adamw", "lr": 1e-4, **(optimizer or {})}
        self.scheduler_cfg = {"name": "none", **(scheduler or {})}
        self.val_acc = VQAAccuracy(answer_types, question_types)
        self.test_acc = VQAAccuracy(answer_types, question_types, answers=self.answers)
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})
        self.test_report: dict[str, Any] = {}

    def forward(self, batch: VLBatch) -> torch.Tensor:
        """Answer logits."""
        return self.model(batch)

    def forward_extras(self, batch: VLBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        """Answer logits and the model's extra outputs (empty if it has none;
        :func:`vlcompress.models.contract.forward_extras`)."""
        return contract.forward_extras(self.model, batch)

    def decode(self, logits: torch.Tensor) -> list[str]:
        """Predicted answer strings."""
        return [self.answers[i] for i in logits.argmax(dim=-1).tolist()]

    def example_scores(self, logits: torch.Tensor, batch: VLBatch) -> torch.Tensor:
        """The official VQA accuracy of each example's top answer, ``(B,)`` (what callbacks
        that evaluate several models on one batch score with, e.g. ``SlimmableTraining``)."""
        from vlcompress.metrics.vqa_eval import answer_accuracy

        if batch.answers is None:
            raise ValueError("example_scores needs the batch's human answers (batch.answers).")
        scores = [answer_accuracy(p, a) for p, a in zip(self.decode(logits), batch.answers)]
        return torch.tensor(scores, dtype=torch.float32)

    def training_step(self, batch: VLBatch, batch_idx: int) -> torch.Tensor:
        """Loss on one training batch."""
        logits, extras = self.forward_extras(batch)
        loss = self.loss_fn(logits, batch, extras)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    def _eval_step(self, batch: VLBatch, metric: VQAAccuracy, stage: str) -> None:
        logits, extras = self.forward_extras(batch)
        if batch.targets is not None:
            # A metric, not a per-step all-reduce: under DDP the ranks' evaluation shards may
            # differ by a batch (no padding), so nothing may synchronise per step.
            mean = self.eval_loss[stage]
            mean.update(self.loss_fn(logits, batch, extras).detach(), weight=len(batch))
            self.log(f"{stage}/loss", mean, on_step=False, on_epoch=True, batch_size=len(batch))
        metric.update(self.decode(logits), batch.answers, batch.answer_type, batch.question_type)

    def validation_step(self, batch: VLBatch, batch_idx: int) -> None:
        """Loss and official accuracy on a validation batch."""
        self._eval_step(batch, self.val_acc, "val")

    def on_validation_epoch_end(self) -> None:
        """Log validation accuracy."""
        self.log("val/acc", self.val_acc.compute(), prog_bar=True, sync_dist=False)
        self.val_acc.reset()

    def test_step(self, batch: VLBatch, batch_idx: int) -> None:
        """Loss and official accuracy on a test batch."""
        self._eval_step(batch, self.test_acc, "test")

    def on_test_epoch_end(self) -> None:
        """Log test accuracy and keep the breakdown by answer / question type."""
        acc = float(self.test_acc.compute())
        self.test_report = {"accuracy": acc, **self.test_acc.breakdown()}
        self.log("test/acc", acc)
        self.test_acc.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the global RNG states (dropout etc.) so a resumed run continues exactly, and
        the answer list (checked when a later stage starts from this checkpoint)."""
        checkpoint["vlcompress_answers"] = list(self.answers)
        checkpoint["vlcompress_rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the RNG states saved by :meth:`on_save_checkpoint`."""
        rng = checkpoint.get("vlcompress_rng")
        if rng is not None:
            _set_rng(rng)
        self._resumed_rng = rng

    def on_train_batch_start(self, batch: VLBatch, batch_idx: int) -> None:
        """After a resume in the middle of an epoch, restore the RNG states once more at the
        first batch: creating the epoch's data iterator (and any evaluation in between) drew
        from the global RNG, which the uninterrupted run did before the checkpoint."""
        rng, self._resumed_rng = getattr(self, "_resumed_rng", None), None
        if rng is not None and batch_idx > 0:
            _set_rng(rng)

    def configure_optimizers(self) -> Any:
        """Optimiser and scheduler from the configuration."""
        o = self.optimizer_cfg
        params = param_groups(self, o["lr"], o.get("lr_scale") or {})
        name = o["name"]
        if name in ("adam", "adamw"):
            cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
            opt = cls(
                params,
                lr=o["lr"],
                betas=tuple(o.get("betas", (0.9, 0.999))),
                weight_decay=o.get("weight_decay", 0.0),
            )
        elif name == "sgd":
            opt = torch.optim.SGD(
                params,
                lr=o["lr"],
                momentum=o.get("momentum", 0.9),
                weight_decay=o.get("weight_decay", 0.0),
            )
        else:
            raise ValueError(f"unknown optimizer {name!r}; use adam, adamw or sgd.")
        s = self.scheduler_cfg
        if s["name"] == "none":
            return opt
        if s["name"] == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(
                opt, milestones=list(s.get("milestones", [])), gamma=s.get("gamma", 0.1)
            )
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if s["name"] in ("cosine", "warmup_cosine"):
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = int(s.get("warmup_steps", 0)) if s["name"] == "warmup_cosine" else 0

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                progress = min(1.0, (step - warm) / max(1, total - warm))
                return 0.5 * (1.0 + math.cos(math.pi * progress))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        raise ValueError(
            f"unknown scheduler {s['name']!r}; use none, step, cosine or warmup_cosine."
        )


@dataclass(frozen=True)
class VQATaskOptions:
    """Options of the ``vqa`` task. It has none of its own yet: the loss, optimiser and
    schedule are configured in their own sections (``loss``, ``optim``, ``scheduler``)."""


@registry.register(
    "task",
    "vqa",
    options=VQATaskOptions,
    context=("model", "answers", "loss", "optimizer", "scheduler", "answer_types",
             "question_types", "question_type_prior"),
)  # fmt: skip
def vqa_task(options: VQATaskOptions, **context: Any) -> VQATask:
    """VQA: soft-score targets, a task loss, the official VQA accuracy (:class:`VQATask`)."""
    return VQATask(**context)


def rng_state() -> dict[str, Any]:
    """The global RNG states a resumed run needs (tensors and plain types: a checkpoint holding
    them loads with ``weights_only=True``): torch's CPU generator, the current CUDA device's
    (dropout on a GPU, the attention kernel's in-kernel dropout seeds), numpy's and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(gauss),
        ],  # fmt: skip
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng(rng: dict[str, Any]) -> None:
    """Set the RNG states of :func:`rng_state` (a CUDA state only where CUDA is in use: a run
    saved on a GPU resumes on the CPU with the CPU's states)."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(rng["python"])
