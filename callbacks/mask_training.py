"""``MaskTraining``: learn which weights to keep (seed 000's stage 2) — real-valued scores, a
straight-through threshold, per-matrix thresholds reset so each matrix holds its exact target."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlcompress.callbacks.pruning_base import PruningCallback, pack_mask, unpack_mask
from vlcompress.compress.pruning import ForwardMasks, keep_count
from vlcompress.compress.pruning.apply import masked_weight
from vlcompress.compress.pruning.ranking import exact_keep_mask
from vlcompress.registry import register

__all__ = ["MaskTraining"]

log = logging.getLogger(__name__)

FREEZE = ("all_but_head", "masked", "none")


@register("callback", "mask_training")
class MaskTraining(PruningCallback):
    """Train a binary mask over the prunable weights (Zhao et al. 2020; seed 000, stage 2).

    Every maskable weight ``W`` gets a real score ``s``. The forward pass uses ``W * 1[s >
    tau]`` (the weight tensors are never changed), and the backward pass sends the gradient
    straight through the threshold to ``s``. Scores start from the magnitudes: ``2 tau`` where
    a per-matrix magnitude ranking keeps the weight, ``0`` where it prunes it (plus a seeded
    jitter of ``1e-6 tau`` so that no two scores tie). Every ``reset_every`` steps each
    matrix's ``tau`` is reset to its k-th smallest score, so every matrix holds exactly its
    target sparsity again (between resets the masks may drift).

    The scores are the callback's owned parameters (``CompressionCallback.owned_parameters``):
    the base trains them with their own Adam optimiser (``score_lr``), stepped right before
    the model's optimiser, with gradients averaged over DDP ranks, so every rank holds the
    same scores and masks. The forward masks are an effect of the base, removed at
    ``teardown`` and put back by the next stage's ``setup``. Scores, thresholds and the score
    optimiser's state are in the checkpoint: a resumed run continues exactly.

    Args:
        sparsity: fraction zeroed, one number or per modality (see :class:`PruningCallback`).
        tau: the initial threshold (seed 000: 0.01).
        reset_every: steps between threshold resets (seed 000: 100); 0 never resets.
        score_lr: learning rate of the scores.
        freeze: ``all_but_head`` (seed 000: only the masks and the task head train),
            ``masked`` (the masked weights are frozen, the rest trains) or ``none`` (the
            weights train together with the masks).
        make_permanent: at the end of training, multiply the weights by their masks and
            remove the hooks (evaluation after ``fit`` then runs on the plain, sparse model).
        include, exclude, seed, model_attr, patterns, name: see :class:`PruningCallback`.

    Example::

        trainer = L.Trainer(callbacks=[MaskTraining({"language": 0.6, "vision": 0.04,
                                                     "cross": 0.6})])
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] = 0.5,
        *,
        tau: float = 0.01,
        reset_every: int = 100,
        score_lr: float = 5e-5,
        freeze: str = "all_but_head",
        make_permanent: bool = True,
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
        self.tau = self.check_argument("tau", tau, float, low=1e-12)
        self.reset_every = self.check_argument("reset_every", reset_every, int, low=0)
        self.score_lr = self.check_argument("score_lr", score_lr, float, low=0.0)
        self.freeze = self.check_argument("freeze", freeze, str, choices=FREEZE)
        self.permanent = self.check_argument("make_permanent", make_permanent, bool)
        self.scores: dict[str, torch.Tensor] = {}
        self.taus: dict[str, float] = {}
        self.resets: list[int] = []
        self._forward: ForwardMasks | None = None
        self._train_taus: tuple[dict, dict] | None = None
        self._val_taus: tuple[dict, dict] | None = None
        self.ties: dict[str, torch.Tensor | None] = {}
        self.final: dict[str, Any] = {}
        self.baked = False

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Find the weights, put the masks of a previous stage back on (evaluation after
        ``fit`` without ``make_permanent``), and freeze what ``freeze`` says (before the
        optimiser is built)."""
        super().setup(trainer, pl_module, stage)
        if self.scores and self._forward is None and not self.baked:
            self._attach_masks()
        if stage != "fit" or self.freeze == "none":
            return
        masked = {id(t.param) for t in self.targets}
        head = set()
        for path in self.anatomy.head_modules:
            head.update(id(p) for p in self.model.get_submodule(path).parameters())
        frozen = 0
        for p in self.model.parameters():
            if id(p) in masked or (self.freeze == "all_but_head" and id(p) not in head):
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
        if self.is_global_zero:
            log.info("%s: froze %s weights (freeze=%s)", self.state_key, f"{frozen:,}", self.freeze)

    def _initial_scores(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, t in enumerate(self.targets):
            w = t.param.detach()
            keep = exact_keep_mask(w.abs(), keep_count(w.numel(), t.sparsity))
            jitter = torch.rand(w.shape, generator=self.generator(0, salt=f"jitter{i}"))
            s = keep.float().cpu() * (2 * self.tau) + jitter * (1e-6 * self.tau)
            out[t.name] = s.to(w.device)
        return out

    def _mask(self, name: str) -> torch.Tensor:
        """The current binary mask of ``name`` (no gradient)."""
        scores, tau = self.scores[name].detach(), self.taus[name]
        keep = scores > tau
        tie = self.ties.get(name)
        if tie is not None:
            keep |= tie & (scores == tau)
        return keep

    def _effective(
        self, name: str, weight: torch.Tensor, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        scores, tie = self.scores[name], self.ties.get(name)
        if rows is not None:  # an embedding's looked-up rows
            scores = torch.nn.functional.embedding(rows, scores)
            tie = tie[rows] if tie is not None else None
        return masked_weight(weight, scores, self.taus[name], tie)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Create (or move) the scores, their optimiser, and the forward masks."""
        params = self.params
        if not self.scores:
            self.scores = self._initial_scores()
            self.taus = {n: self.tau for n in self.scores}
        if self._train_taus is not None:  # fit again after an earlier fit's final thresholds
            (self.taus, self.ties), self._train_taus = self._train_taus, None
        self.scores = {
            n: s.detach().to(params[n].device, torch.float32).requires_grad_(True)
            for n, s in self.scores.items()
        }
        self.ties = {
            n: (m.to(params[n].device) if m is not None else None) for n, m in self.ties.items()
        }
        super().on_fit_start(trainer, pl_module)  # the score optimiser
        if self._forward is None:
            self._attach_masks()
        self._refresh_masks()
        self.log_report("at the start of mask training")

    def _attach_masks(self) -> None:
        """Compute the weights through the scores' masks until ``teardown``."""
        self._forward = ForwardMasks(self.model, list(self.scores), effective=self._effective)
        self.add_effect("forward masks", self._detach_masks)

    def _detach_masks(self) -> None:
        if self._forward is not None:
            self._forward.remove()
            self._forward = None

    def owned_parameters(self) -> list[torch.Tensor]:
        """The scores (trained by the base's owned optimiser)."""
        return list(self.scores.values())

    def configure_owned_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """Adam over the scores at ``score_lr``."""
        return torch.optim.Adam(params, lr=self.score_lr)

    def _refresh_masks(self) -> None:
        self.masks = {n: self._mask(n) for n in self.scores}
        self.reached = {t.name: t.sparsity for t in self.targets}

    # ------------------------------------------------------------------ training
    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Reset the thresholds every ``reset_every`` steps."""
        step = int(trainer.global_step)
        if self.reset_every and step > 0 and step % self.reset_every == 0:
            if not self.resets or self.resets[-1] != step:
                self._reset_thresholds(step)

    @torch.no_grad()
    def _exact_taus(self) -> tuple[dict[str, float], dict[str, torch.Tensor | None]]:
        """Per matrix, the threshold under which exactly its target share of scores lies, and
        which scores equal to it stay (float32 scores tie in large matrices)."""
        taus: dict[str, float] = {}
        ties: dict[str, torch.Tensor | None] = {}
        for t in self.targets:
            s = self.scores[t.name].detach()
            keep = keep_count(s.numel(), t.sparsity)
            if keep == s.numel():
                taus[t.name], ties[t.name] = float(s.min()) - 1.0, None
                continue
            exact = exact_keep_mask(s, keep)
            tau = float(torch.kthvalue(s.reshape(-1).float().cpu(), s.numel() - keep).values)
            taus[t.name] = tau
            tied = exact & (s == tau)
            ties[t.name] = tied if bool(tied.any()) else None
        return taus, ties

    def _reset_thresholds(self, step: int) -> None:
        self.taus, self.ties = self._exact_taus()
        self.resets.append(step)
        self._refresh_masks()
        rep = self.sparsity_report()["overall"]
        self.events.append({"step": step, "sparsity": rep["actual"]})

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Validate at exactly the target sparsity (between resets the masks drift); the
        training thresholds come back afterwards, so validation never changes training."""
        if self._forward is not None and self.scores and self._val_taus is None:
            self._val_taus = (dict(self.taus), dict(self.ties))
            self.taus, self.ties = self._exact_taus()

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Restore the training thresholds."""
        if self._val_taus is not None:
            (self.taus, self.ties), self._val_taus = self._val_taus, None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Reset the thresholds a last time (every matrix at exactly its target), report, and
        make the masks permanent if asked."""
        if self.scores and self._forward is not None:
            self._refresh_masks()
            drift = self.sparsity_report()["overall"]["actual"]
            if self._train_taus is None:  # what a resumed run continues from
                self._train_taus = (dict(self.taus), dict(self.ties))
            self.taus, self.ties = self._exact_taus()
            self._refresh_masks()
            self.final = {"step": int(trainer.global_step), "sparsity_before_final_reset": drift}
        self.log_report("at the end of mask training", layers=True)
        if self.permanent:
            self.make_permanent()

    def make_permanent(self) -> None:
        """Multiply the weights by their masks and remove the forward hooks."""
        if self._forward is None:
            return
        self._refresh_masks()
        self._forward.bake()
        self._detach_masks()
        self.baked = True
        if self.is_global_zero:
            log.info("%s: masks baked into the weights", self.state_key)

    def report(self) -> dict[str, Any]:
        """The sparsity report, the resets, and the drift before the final thresholds."""
        out = super().report()
        if out and self.final:
            out["final"] = dict(self.final)
        return out

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        """Scores, thresholds, resets and the current masks (the base saves the score
        optimiser)."""
        # the masks handed to a later stage (masks_from) hold exactly the targets
        exact = {
            t.name: exact_keep_mask(self.scores[t.name], keep_count(t.numel, t.sparsity))
            for t in self.targets
            if t.name in self.scores
        }
        out = self.mask_state(exact if self.scores else None)
        out["scores"] = {n: s.detach().cpu().clone() for n, s in self.scores.items()}
        taus, ties = self._val_taus or self._train_taus or (self.taus, self.ties)
        out["taus"] = dict(taus)  # the training thresholds, never the evaluation ones
        out["ties"] = {n: pack_mask(m) for n, m in ties.items() if m is not None}
        out["resets"] = list(self.resets)
        out["baked"] = self.baked
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back the scores and thresholds (applied from ``on_fit_start``)."""
        self.load_mask_state(state)
        self.scores = {n: s.clone() for n, s in (state.get("scores") or {}).items()}
        self.taus = {n: float(v) for n, v in (state.get("taus") or {}).items()}
        self.ties = {n: unpack_mask(m) for n, m in (state.get("ties") or {}).items()}
        self.resets = [int(s) for s in state.get("resets") or []]
        self.baked = bool(state.get("baked", False))
        if state.get("optimizer") is not None:  # written before the base owned the optimiser
            self._owned_opt_state = state["optimizer"]
