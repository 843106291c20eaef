"""``MagnitudePruning``: one-shot or iterative magnitude pruning, unstructured or N:M, with
optional weight rewinding (lottery ticket), masks kept exactly across resumes and DDP ranks."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vlcompress.callbacks.pruning_base import PruningCallback, unpack_mask
from vlcompress.compress.pruning import (
    SCHEDULES,
    PruningSchedule,
    group_masks,
    nm_mask,
    zero_masked,
)
from vlcompress.registry import register

__all__ = ["MagnitudePruning", "masks_in_checkpoint"]

log = logging.getLogger(__name__)

GRANULARITIES = ("unstructured", "n:m")
RANKINGS = ("per_matrix", "global")


def masks_in_checkpoint(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The masks a pruning callback stored in a checkpoint.

    Args:
        source: a ``.ckpt`` file, a vlcompress run folder (the checkpoint ``init_from`` would
            take: the reported best one, else ``last.ckpt``), or a loaded checkpoint dict.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: the checkpoint holds no pruning masks, or masks of several callbacks.
    """
    if isinstance(source, Mapping):
        ckpt, where = source, "the init_from checkpoint"
    else:
        from vlcompress.utils.init_from import resolve_init_path

        try:
            p = resolve_init_path(
                source, "masks_from", "give the run folder or .ckpt file of a pruning run"
            )
        except Exception as e:  # a ConfigError naming the expected files
            raise FileNotFoundError(str(e)) from e
        ckpt, where = torch.load(p, map_location="cpu", weights_only=True), str(p)
    found = {
        key: entry["state"]["masks"]
        for key, entry in (ckpt.get("callbacks") or {}).items()
        if isinstance(entry, dict) and isinstance(entry.get("state"), dict)
        and entry["state"].get("masks")
    }  # fmt: skip
    if not found:
        raise ValueError(
            f"masks_from: {where} holds no pruning masks (no MagnitudePruning / MaskTraining "
            "state in its callbacks); give the checkpoint of a pruning run"
        )
    if len(found) > 1:
        raise ValueError(
            f"masks_from: {where} holds masks of several callbacks {sorted(found)}; give a "
            "checkpoint with one pruning callback"
        )
    (masks,) = found.values()
    return {n: unpack_mask(m) for n, m in masks.items()}


@register("callback", "magnitude_pruning")
class MagnitudePruning(PruningCallback):
    """Zero the smallest-magnitude weights, once or on a step-level schedule.

    At every pruning event (a global step, before its batch) the masks are recomputed from the
    current magnitudes (already-pruned weights stay pruned) and the pruned weights are set to
    zero; after every optimiser step they are zeroed again, so they stay exactly zero while the
    rest trains. Masks, the schedule's progress and the rewind weights are in the checkpoint:
    a resumed run ends with the same masks and metrics as an uninterrupted one (Lightning's
    ``ModelPruning`` restarts its schedule on resume). Every DDP rank holds the same masks.

    Args:
        sparsity: fraction of weights zeroed (0.9 keeps 10%), one number or per modality
            (``{"language": 0.6, "vision": 0.04, "cross": 0.6}``). Ignored for ``n:m`` (which
            zeroes ``1 - n/m``).
        schedule: ``one_shot``, ``constant``, ``linear`` or ``cubic`` (Zhu & Gupta), see
            :class:`~vlcompress.compress.pruning.PruningSchedule`.
        start_step: first pruning event (global step).
        end_step: last event (iterative schedules; default ``start_step``).
        every: steps between events.
        ranking: ``per_matrix`` (every matrix holds exactly its target) or ``global`` (the
            matrices of a modality are ranked together).
        granularity: ``unstructured`` or ``n:m`` (keep ``n`` of every ``m`` consecutive inputs
            of each row; 2:4 runs as semi-structured sparsity on GPUs).
        n, m: the N:M pattern.
        rewind_step: lottery-ticket rewinding: the weights at this step are stored and, after
            the last pruning event, the surviving weights are set back to them.
        masks_from: a checkpoint (or run folder) of an earlier pruning run whose masks are
            applied at the start and kept fixed (stage 3 of seed 000: fine-tune the
            subnetwork); the schedule is then not used. ``"init"``: the checkpoint the run
            started from (``init_from``, kept as ``pl_module.init_checkpoint``).
        include, exclude: regular expressions on parameter names (which weights may be pruned;
            default: the anatomy's prunable weights).
        seed, model_attr, patterns, name: see :class:`CompressionCallback`.

    Example::

        trainer = L.Trainer(callbacks=[MagnitudePruning(0.9, schedule="cubic", start_step=0,
                                                        end_step=1000, every=100)])
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] = 0.5,
        *,
        schedule: str = "one_shot",
        start_step: int = 0,
        end_step: int | None = None,
        every: int = 100,
        ranking: str = "per_matrix",
        granularity: str = "unstructured",
        n: int = 2,
        m: int = 4,
        rewind_step: int | None = None,
        masks_from: str | None = None,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        seed: int | None = None,
        model_attr: Any = None,
        patterns: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(
            sparsity,
            include=include,
            exclude=exclude,
            seed=seed,
            model_attr=model_attr,
            patterns=patterns,
            name=name,
        )
        self.check_argument("schedule", schedule, str, choices=SCHEDULES)
        self.check_argument("start_step", start_step, int, low=0)
        if end_step is not None:
            self.check_argument("end_step", end_step, int, low=start_step)
        self.check_argument("every", every, int, low=1)
        self.ranking = self.check_argument("ranking", ranking, str, choices=RANKINGS)
        self.granularity = self.check_argument(
            "granularity", granularity, str, choices=GRANULARITIES
        )
        self.n = self.check_argument("n", n, int, low=1)
        self.m = self.check_argument("m", m, int, low=self.n)
        if granularity == "n:m" and schedule != "one_shot":
            raise ValueError(
                f"MagnitudePruning: granularity='n:m' prunes once (schedule='one_shot'); got "
                f"schedule={schedule!r}"
            )
        if rewind_step is not None:
            self.check_argument("rewind_step", rewind_step, int, low=0, high=start_step)
        self.rewind_step = rewind_step
        if masks_from is not None and not isinstance(masks_from, str):
            raise TypeError(f"MagnitudePruning: masks_from must be a path; got {masks_from!r}")
        self.masks_from = masks_from
        self.plan = PruningSchedule(
            schedule, start_step, start_step if end_step is None else end_step, every
        )
        self.done: list[int] = []  # events already carried out
        self.rewind_weights: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ checks
    def preflight(self, model: torch.nn.Module) -> list[str]:
        """:class:`PruningCallback`'s checks, and that ``masks_from`` names a checkpoint or run
        folder: before a fresh vlcompress run or in ``validate`` (at ``setup`` a resumed run
        may already hold the masks, so the path is read, and checked, when the fit starts;
        ``"init"`` is checked then too: it needs ``init_from``)."""
        problems = super().preflight(model)
        fresh = not self.resuming_run and self._trainer is None
        if self.masks_from is not None and self.masks_from != "init" and fresh:
            from vlcompress.config import ConfigError
            from vlcompress.utils.init_from import resolve_init_path

            try:
                resolve_init_path(self.masks_from, *self._masks_from_words())
            except ConfigError as e:
                problems += list(e.errors)
        return problems

    def _masks_from_words(self) -> tuple[str, str]:
        """How messages name ``masks_from`` and the fix for a missing one."""
        return (
            self.advise(lightning="masks_from", vlcompress="options.masks_from"),
            "give the run folder (or .ckpt file) of the pruning run whose masks to keep, "
            "or 'init' for the init_from checkpoint",
        )

    # ------------------------------------------------------------------ decisions
    def _compute_masks(self, step: int) -> dict[str, torch.Tensor]:
        params = self.params
        if self.granularity == "n:m":
            self.reached = {t.name: 1.0 - self.n / self.m for t in self.targets}
            return {n: nm_mask(p, self.n, self.m) for n, p in params.items()}
        rates = {t.name: self.plan.sparsity_at(step, t.sparsity) for t in self.targets}
        scores = {}
        for name, p in params.items():
            s = p.detach().abs().float()
            if name in self.masks:  # pruned weights stay pruned
                s = torch.where(self.masks[name].to(s.device), s, torch.full_like(s, -1.0))
            scores[name] = s
        groups = None
        if self.ranking == "global":
            groups = {t.name: f"{t.modality}:{rates[t.name]}" for t in self.targets}
        self.reached = rates
        return group_masks(scores, rates, groups)

    def _prune(self, step: int) -> None:
        self.masks = self.agree(self._compute_masks(step))
        last = step == self.plan.events()[-1]
        if last and self.rewind_weights is not None:
            own = self.model.state_dict()
            with torch.no_grad():
                for k, v in self.rewind_weights.items():
                    own[k].copy_(v.to(own[k].device))
            if self.is_global_zero:
                log.info("%s: weights rewound to step %s", self.state_key, self.rewind_step)
        zero_masked(self.params, self.masks)
        self.done.append(step)
        rep = self.sparsity_report()["overall"]
        self.events.append({"step": step, "sparsity": rep["actual"]})
        self.log_report(f"at step {step}")

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Apply the fixed masks of ``masks_from`` (once; a resumed run has them already)."""
        super().on_fit_start(trainer, pl_module)
        if self.masks_from is not None and not self.masks:
            source: Any = self.masks_from
            if source == "init":
                source = getattr(pl_module, "init_checkpoint", None)
                if source is None:
                    raise ValueError(
                        f"{self.state_key}: masks_from='init' needs a run started with "
                        "init_from=<the pruning run>; this run has no init_from checkpoint"
                    )
            masks = masks_in_checkpoint(source)
            params = self.params
            missing = sorted(set(params) - set(masks))
            if missing:
                raise ValueError(
                    f"{self.state_key}: masks_from={self.masks_from} has no mask for "
                    f"{missing[:3]}{'...' if len(missing) > 3 else ''}; prune the same weights "
                    "(include/exclude, sparsity modalities) as the run that made the masks"
                )
            self.masks = {n: masks[n].to(params[n].device) for n in params}
            self.reached = {n: 1.0 - float(m.float().mean()) for n, m in self.masks.items()}
            zero_masked(params, self.masks)
            self.events.append({"step": int(trainer.global_step), "masks_from": self.masks_from})
            self.log_report(f"masks from {self.masks_from}")
        elif self.masks:
            zero_masked(self.params, self.masks)

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Store rewind weights and carry out due pruning events."""
        if self.masks_from is not None:
            return
        step = int(trainer.global_step)
        if (
            self.rewind_step is not None
            and self.rewind_weights is None
            and step >= self.rewind_step
        ):
            self.rewind_weights = {
                k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
            }
        due = [s for s in self.plan.events() if s <= step and s not in self.done]
        if due:
            self.done.extend(due[:-1])
            self._prune(due[-1])

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        """Zero the pruned weights again after the optimiser step."""
        if self.masks:
            zero_masked(self.params, self.masks)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Log the final sparsity report."""
        self.log_report("at the end of training", layers=True)

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Masks (bit-packed), events done, reached sparsities, rewind weights."""
        out = self.mask_state()
        out["done"] = list(self.done)
        out["rewind"] = self.rewind_weights
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back the masks and re-apply them to the weights."""
        self.load_mask_state(state)
        self.done = [int(s) for s in state.get("done") or []]
        self.rewind_weights = state.get("rewind")
        if self.masks and self.targets:
            zero_masked(self.params, self.masks)

    def make_permanent(self, semi_structured: bool = False) -> list[str]:
        """Write the masks into the weights (they already are: pruned weights are zero).

        Args:
            semi_structured: for 2:4 masks on a CUDA model, also swap the ``nn.Linear`` weights
                for ``torch.sparse`` semi-structured tensors (faster inference on sparse tensor
                cores; see :func:`~vlcompress.compress.pruning.apply.to_semi_structured`).

        Returns:
            The weights converted to semi-structured tensors (empty otherwise).
        """
        if self.masks:
            zero_masked(self.params, self.masks)
        if not semi_structured:
            return []
        if self.granularity != "n:m" or (self.n, self.m) != (2, 4):
            raise ValueError(
                f"{self.state_key}: semi-structured tensors need 2:4 masks; this callback prunes "
                f"{self.granularity}" + (f" {self.n}:{self.m}" if self.granularity == "n:m" else "")
            )
        from vlcompress.compress.pruning.apply import to_semi_structured

        return to_semi_structured(self.model, list(self.masks))
