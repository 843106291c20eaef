"""``StagedFreeze``: keep whole modalities (a pretrained language stream, say) fixed for the first
optimiser steps, then train them with the rest — staged fine-tuning of fresh layers around a
pretrained encoder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from vlcompress.callbacks.base import CompressionCallback
from vlcompress.models.anatomy import Anatomy, Modality
from vlcompress.registry import register

__all__ = ["StagedFreeze", "modality_parameters"]

log = logging.getLogger(__name__)


def modality_parameters(
    model: nn.Module, anatomy: Anatomy, modalities: Sequence[Modality]
) -> dict[str, nn.Parameter]:
    """Every parameter that belongs to ``modalities``: inside their declared layers and their
    extra modules (embeddings, input projections, norms) and extra weights.

    Args:
        model: the model the anatomy describes.
        anatomy: its anatomy.
        modalities: the modalities to collect.

    Returns:
        ``{parameter name: parameter}`` (the model's own tensors), in the model's order.
    """
    wanted = set(modalities)
    prefixes = [x.name for x in anatomy.layers if x.modality in wanted]
    for m in wanted:
        prefixes += list(anatomy.extra_modules.get(m, []))
        prefixes += list(anatomy.extra_weights.get(m, []))
    return {
        name: p
        for name, p in model.named_parameters()
        if any(name == q or name.startswith(q + ".") for q in prefixes)
    }


@register("callback", "staged_freeze")
class StagedFreeze(CompressionCallback):
    """Freeze the parameters of some modalities until ``until_step`` optimiser steps have run.

    The usual recipe for fresh layers on a pretrained encoder: the fresh vision and cross
    layers learn first at a high rate while the pretrained language stream stays as it was
    (and costs no backward pass), then everything trains together (with ``optim.lr_scale`` the
    pretrained layers at a fraction of the rate). The parameters come from the anatomy
    (:func:`modality_parameters`), so it works on any model with one.

    On one process the frozen parameters get ``requires_grad=False`` (no backward through
    them: faster). Under DDP, whose gradient buckets are fixed when the model is wrapped, they
    keep ``requires_grad`` and their gradients are dropped before the optimiser step instead;
    either way the optimiser skips them (no update, no weight decay, no state) and the result
    is the same. The stage follows ``trainer.global_step`` alone, so a resumed run freezes or
    not exactly as the uninterrupted one did; ``teardown`` restores ``requires_grad``.

    Args:
        modalities: the modalities to freeze (``language``, ``vision``, ``cross``).
        until_step: the optimiser step from which they train (``>= 1``).
        model_attr: where the model sits on the LightningModule (see
            :class:`CompressionCallback`).
        patterns: anatomy patterns for a model that is not recognised.
        name: a name for this callback's checkpoint and report entries.

    Example::

        trainer = L.Trainer(callbacks=[StagedFreeze(["language"], until_step=600)])
    """

    def __init__(
        self,
        modalities: list[str] = ["language"],  # noqa: B006 - copied; the registry reads it
        until_step: int = 1000,
        *,
        model_attr: Any = None,
        patterns: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(seed=0, model_attr=model_attr, patterns=patterns, name=name)
        if isinstance(modalities, str) or not isinstance(modalities, Sequence) or not modalities:
            raise ValueError(
                f"StagedFreeze: modalities must be a non-empty list such as ['language']; "
                f"got {modalities!r}"
            )
        known = [m.value for m in Modality if m.value != "head"]
        for m in modalities:
            self.check_argument("modalities", m, str, choices=known)
        self.modalities = [Modality(m) for m in dict.fromkeys(modalities)]
        self.until_step = self.check_argument("until_step", until_step, int, low=1)
        self._params: dict[str, nn.Parameter] = {}
        self._frozen = False
        self.unfrozen_at: int | None = None

    # ------------------------------------------------------------------ checks
    def preflight(self, model: nn.Module) -> list[str]:
        """A problem when the anatomy declares no parameter of the chosen modalities."""
        problems = super().preflight(model)
        anatomy = self.preflight_anatomy(model)
        if anatomy is not None and not modality_parameters(model, anatomy, self.modalities):
            names = ", ".join(m.value for m in self.modalities)
            problems.append(
                f"the model's anatomy declares no parameters of {names}: nothing to freeze "
                f"(its modalities: {', '.join(m.value for m in anatomy.modalities)})"
            )
        return problems

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Find the parameters and apply the stage of the current step."""
        super().on_fit_start(trainer, pl_module)
        self._params = modality_parameters(self.model, self.anatomy, self.modalities)
        before = {n: p.requires_grad for n, p in self._params.items()}

        def restore() -> None:
            for n, p in self._params.items():
                p.requires_grad_(before[n])
            self._frozen = False

        self.add_effect("frozen parameters", restore)
        self._apply(trainer.global_step)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Freeze before ``until_step``, unfreeze from it."""
        self._apply(trainer.global_step)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Under DDP, drop the frozen parameters' gradients so the optimiser skips them."""
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self._frozen and self.world_size > 1:
            for p in self._params.values():
                p.grad = None

    def _apply(self, step: int) -> None:
        frozen = step < self.until_step
        if frozen == self._frozen:
            return
        self._frozen = frozen
        if self.world_size == 1:
            for p in self._params.values():
                p.requires_grad_(not frozen)
        count = sum(p.numel() for p in self._params.values())
        what = ", ".join(m.value for m in self.modalities)
        if frozen:
            log.info(
                "%s: %s frozen (%d parameters) until step %d",
                self.state_key,
                what,
                count,
                self.until_step,
            )
        else:
            self.unfrozen_at = step
            log.info("%s: %s trains from step %d", self.state_key, what, step)

    # ------------------------------------------------------------------ state and report
    def state(self) -> dict[str, Any]:
        """``{"unfrozen_at": the step the modalities started to train, or None}``."""
        return {"unfrozen_at": self.unfrozen_at}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back :meth:`state` (the stage itself follows the global step)."""
        self.unfrozen_at = state.get("unfrozen_at")

    def report(self) -> dict[str, Any]:
        """Modalities, ``until_step``, the step they started to train and how many parameters."""
        return {
            "modalities": [m.value for m in self.modalities],
            "until_step": self.until_step,
            "unfrozen_at": self.unfrozen_at,
            "frozen_parameters": int(sum(p.numel() for p in self._params.values())),
        }

    def report_rows(self) -> list[tuple[str, str]]:
        """One row: what was frozen and until when."""
        what = "+".join(m.value for m in self.modalities)
        at = "never" if self.unfrozen_at is None else f"step {self.unfrozen_at}"
        return [(f"frozen {what}", f"until {at}")]
