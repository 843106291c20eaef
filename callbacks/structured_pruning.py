"""``StructuredPruning``: remove whole attention heads and FFN neurons (by magnitude or a
first-order score), switched off by masks during training and physically removed at the end."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from vlcompress.callbacks.base import CompressionCallback
from vlcompress.compress.pruning import SCHEDULES, PruningSchedule, keep_count, parse_sparsity
from vlcompress.compress.pruning.ranking import exact_keep_mask, unit_norms
from vlcompress.compress.pruning.sparsity import target_for
from vlcompress.registry import register

__all__ = ["StructuredPruning"]

_GATES = "head and FFN gates"

log = logging.getLogger(__name__)

IMPORTANCES = ("magnitude", "first_order")
RANKINGS = ("per_block", "global")


@register("callback", "structured_pruning")
class StructuredPruning(CompressionCallback):
    """Prune attention heads and FFN neurons; optionally remove them for good after training.

    Each attention block and FFN block gets a gate (one value per head / neuron) through the
    anatomy (:meth:`Anatomy.mask_heads`, :meth:`Anatomy.mask_ffn_units`), so it works on every
    model the anatomy covers. At each pruning event the least important live units are
    switched off:

    * ``magnitude`` — the L2 norm of the unit's weights (a head's q/k/v rows and output
      columns; a neuron's up row and down column);
    * ``first_order`` — ``|dL/dgate|`` accumulated over the training steps since the previous
      event (Michel et al. 2019, "Are sixteen heads really better than one?"), summed over DDP
      ranks; it needs training steps before the first event (``start_step >= 1``).

    With ``make_permanent`` the switched-off heads and neurons are physically removed at the
    end of training (:func:`vlcompress.compress.structured.remove_heads`), so the model that is
    evaluated and exported is really smaller and faster. Gates, importance accumulators and
    events are in the checkpoint (exact resume); decisions agree on every DDP rank.

    Args:
        heads: fraction of attention heads removed, one number or per modality
            (``{"language": 0.5, "cross": 0.25}``); 0 leaves heads alone.
        neurons: fraction of FFN neurons removed, likewise.
        importance: ``magnitude`` or ``first_order``.
        ranking: ``per_block`` (every block loses its share) or ``global`` (units of a modality
            ranked together, each block's scores normalised by their L2 norm, as Michel et al.).
        schedule, start_step, end_step, every: as :class:`MagnitudePruning`.
        make_permanent: physically remove the pruned units at the end of training.
        seed, model_attr, patterns, name: see :class:`CompressionCallback`.

    Example::

        StructuredPruning(heads=0.5, neurons=0.5, importance="first_order", start_step=200,
                          make_permanent=True)
    """

    def __init__(
        self,
        heads: float | Mapping[str, float] = 0.0,
        neurons: float | Mapping[str, float] = 0.0,
        *,
        importance: str = "magnitude",
        ranking: str = "per_block",
        schedule: str = "one_shot",
        start_step: int = 0,
        end_step: int | None = None,
        every: int = 100,
        make_permanent: bool = False,
        seed: int | None = None,
        model_attr: Any = None,
        patterns: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(seed=seed, model_attr=model_attr, patterns=patterns, name=name)
        self.heads = parse_sparsity(heads, "StructuredPruning: heads", "attention heads removed")
        self.neurons = parse_sparsity(
            neurons, "StructuredPruning: neurons", "FFN units (neurons) removed"
        )
        self.importance = self.check_argument("importance", importance, str, choices=IMPORTANCES)
        self.ranking = self.check_argument("ranking", ranking, str, choices=RANKINGS)
        self.check_argument("schedule", schedule, str, choices=SCHEDULES)
        self.check_argument("start_step", start_step, int, low=0)
        if end_step is not None:
            self.check_argument("end_step", end_step, int, low=start_step)
        self.check_argument("every", every, int, low=1)
        if importance == "first_order" and start_step < 1:
            raise ValueError(
                "StructuredPruning: importance='first_order' needs gradients from training "
                "steps before the first event; set start_step >= 1"
            )
        self.permanent = self.check_argument("make_permanent", make_permanent, bool)
        self.plan = PruningSchedule(
            schedule, start_step, start_step if end_step is None else end_step, every
        )
        self.gates: dict[str, torch.Tensor] = {}  # "head:<block>" / "ffn:<block>" -> gate
        self.scores: dict[str, torch.Tensor] = {}  # first-order accumulators
        self.done: list[int] = []
        self.events: list[dict[str, Any]] = []
        self.kept: dict[str, list[int]] = {}  # after make_permanent
        self._handles: list[Any] = []
        self._blocks: dict[str, tuple[str, str, str]] = {}  # key -> (kind, name, modality)

    # ------------------------------------------------------------------ set-up
    def _select(self, anatomy: Any) -> dict[str, tuple[str, str, str]]:
        """The blocks to gate: ``"head:<name>"`` / ``"ffn:<name>"`` -> (kind, name, modality)."""
        blocks: dict[str, tuple[str, str, str]] = {}
        for a in anatomy.attentions:
            if target_for(self.heads, a.modality.value):
                blocks[f"head:{a.name}"] = ("head", a.name, a.modality.value)
        for f in anatomy.ffns:
            if target_for(self.neurons, f.modality.value):
                blocks[f"ffn:{f.name}"] = ("ffn", f.name, f.modality.value)
        return blocks

    def preflight(self, model: Any) -> list[str]:
        """The anatomy's problems, per-modality targets naming a modality without blocks, and
        nothing to prune (e.g. ``heads=0`` and ``neurons=0``, the defaults)."""
        problems = super().preflight(model)
        anatomy = self.preflight_anatomy(model)
        if anatomy is None:
            return problems
        has = {
            "heads": sorted({a.modality.value for a in anatomy.attentions}),
            "neurons": sorted({f.modality.value for f in anatomy.ffns}),
        }
        blocks = {"heads": "attention blocks", "neurons": "FFN blocks"}
        for arg, targets in (("heads", self.heads), ("neurons", self.neurons)):
            for key in targets:
                if key != "default" and key not in has[arg]:
                    problems.append(
                        f"{self._opt(arg)}[{key!r}]: {type(model).__name__} has no "
                        f"{blocks[arg]} of modality {key!r} (its {blocks[arg]} are in "
                        f"{has[arg]}); name those modalities, or 'default'"
                    )
        if not self._select(anatomy):
            example = self.advise(
                lightning="StructuredPruning(heads=0.5) or StructuredPruning(neurons=0.5)",
                vlcompress="callbacks=[{name: structured_pruning, options: {heads: 0.5}}]",
            )
            problems.append(
                f"nothing to prune: {self._opt('heads')}={self._shown(self.heads)} and "
                f"{self._opt('neurons')}={self._shown(self.neurons)} remove no attention head "
                f"and no FFN unit of {type(model).__name__} (attention blocks in "
                f"{has['heads']}, FFN blocks in {has['neurons']}); set heads to the fraction "
                f"of attention heads to remove and/or neurons to the fraction of FFN units, "
                f"e.g. {example}"
            )
        return problems

    def _opt(self, arg: str) -> str:
        return self.advise(lightning=arg, vlcompress=f"options.{arg}")

    @staticmethod
    def _shown(targets: Mapping[str, float]) -> Any:
        return targets["default"] if list(targets) == ["default"] else dict(targets)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Find the blocks to prune and put the gates on them.

        Raises:
            ValueError: the problems of :meth:`preflight` (nothing to prune, a modality
                without blocks).
        """
        super().setup(trainer, pl_module, stage)
        if self.kept:  # removed for good: nothing to put on the model
            return
        if not self._blocks:
            self._blocks = self._select(self.anatomy)
        if not self.gates:
            self.gates = {k: self._ones(k) for k in self._blocks}
        self._attach()

    def _size(self, key: str) -> int:
        kind, name, _ = self._blocks[key]
        if kind == "head":
            return self.anatomy.attention(name).num_heads
        return self.anatomy.ffn(name).inner_dim

    def _ones(self, key: str) -> torch.Tensor:
        return torch.ones(self._size(key))

    def _attach(self) -> None:
        """Put the gates on the model (again), on its device; an effect of the base, removed
        at ``teardown`` and put back by the next stage's ``setup``."""
        self._detach_gates()
        device = next(self.model.parameters()).device
        grad = self.importance == "first_order"
        for k in self.gates:
            self.gates[k] = self.gates[k].detach().to(device).requires_grad_(grad)
        heads = {self._blocks[k][1]: g for k, g in self.gates.items() if k.startswith("head:")}
        ffns = {self._blocks[k][1]: g for k, g in self.gates.items() if k.startswith("ffn:")}
        self._handles = self.anatomy.mask_heads(self.model, heads)
        self._handles += self.anatomy.mask_ffn_units(self.model, ffns)
        if _GATES not in self.effects.describe():
            self.add_effect(_GATES, self._detach_gates)

    def _detach_gates(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Move the gates to the model's device (after Lightning moved the model)."""
        super().on_fit_start(trainer, pl_module)
        if self.gates and not self.kept:
            self._attach()

    # ------------------------------------------------------------------ importance
    def _magnitude(self, key: str) -> torch.Tensor:
        kind, name, _ = self._blocks[key]
        if kind == "ffn":
            spec = self.anatomy.ffn(name)
            up = self.model.get_submodule(spec.up).weight
            down = self.model.get_submodule(spec.down).weight
            return unit_norms([up, down.t()])
        spec = self.anatomy.attention(name)
        norms = []
        for h in range(spec.num_heads):
            parts = self.anatomy.head_weights(self.model, name, h)
            norms.append(
                sum(float(w.detach()[idx].float().pow(2).sum()) for w, idx in parts.values())
            )
        return torch.tensor(norms).sqrt()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Accumulate ``|dL/dgate|`` (first-order importance)."""
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if self.importance != "first_order" or self.kept:
            return
        for k, g in self.gates.items():
            if g.grad is not None:
                acc = self.scores.get(k)
                grad = g.grad.detach().abs().cpu()
                self.scores[k] = grad if acc is None else acc + grad
                g.grad = None

    def _importance(self) -> dict[str, torch.Tensor]:
        if self.importance == "magnitude":
            return {k: self._magnitude(k) for k in self.gates}
        out = {k: self.scores.get(k, torch.zeros(self._size(k))).clone() for k in self.gates}
        if self.world_size > 1:
            flat = torch.cat([v for v in out.values()]).to(next(self.model.parameters()).device)
            flat = self._trainer.strategy.reduce(flat, reduce_op="sum").cpu()
            start = 0
            for k, v in out.items():
                out[k] = flat[start : start + v.numel()]
                start += v.numel()
        return out

    # ------------------------------------------------------------------ decisions
    def _rate(self, key: str, step: int) -> float:
        kind, _, modality = self._blocks[key]
        final = target_for(self.heads if kind == "head" else self.neurons, modality) or 0.0
        return self.plan.sparsity_at(step, final)

    def _decide(self, step: int) -> dict[str, torch.Tensor]:
        scores = self._importance()
        live = {k: self.gates[k].detach().cpu() > 0 for k in self.gates}
        new: dict[str, torch.Tensor] = {}
        if self.ranking == "per_block":
            for k, s in scores.items():
                s = torch.where(live[k], s.float(), torch.full_like(s.float(), -1.0))
                keep = max(1, keep_count(s.numel(), self._rate(k, step)))
                new[k] = exact_keep_mask(s, keep)
            return new
        groups: dict[tuple[str, str, float], list[str]] = {}
        for k in scores:
            kind, _, modality = self._blocks[k]
            groups.setdefault((kind, modality, self._rate(k, step)), []).append(k)
        for (_, _, rate), keys in groups.items():
            normed = []
            for k in keys:
                s = scores[k].float()
                s = s / s.norm().clamp_min(1e-12)
                normed.append(torch.where(live[k], s, torch.full_like(s, -1.0)))
            flat = torch.cat(normed)
            mask = exact_keep_mask(flat, keep_count(flat.numel(), rate))
            start = 0
            for k, s in zip(keys, normed):
                m = mask[start : start + s.numel()].clone()
                start += s.numel()
                if not m.any():  # never empty a block: keep its best unit
                    m[int(torch.argmax(s))] = True
                new[k] = m
        return new

    def _prune(self, step: int) -> None:
        masks = self.decide(self._decide, step)
        with torch.no_grad():
            for k, m in masks.items():
                self.gates[k].copy_(m.to(self.gates[k].device, self.gates[k].dtype))
        self.scores = {}
        self.done.append(step)
        self.events.append({"step": step, **self._summary()})
        if self.is_global_zero:
            log.info("%s at step %d: %s", self.state_key, step, self._summary())

    def on_train_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int
    ) -> None:
        """Carry out due pruning events."""
        if self.kept:
            return
        step = int(trainer.global_step)
        due = [s for s in self.plan.events() if s <= step and s not in self.done]
        if due:
            self.done.extend(due[:-1])
            self._prune(due[-1])

    # ------------------------------------------------------------------ permanence
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Remove the pruned units for good when ``make_permanent``."""
        if self.permanent and not self.kept:
            self.make_permanent()

    def make_permanent(self) -> dict[str, list[int]]:
        """Physically remove the switched-off heads and neurons; returns the kept indices.

        The callback's anatomy becomes the reduced model's; the gates are gone.
        """
        from vlcompress.compress.structured import remove_ffn_units, remove_heads

        self._detach_gates()
        heads = {
            self._blocks[k][1]: g.detach().cpu() > 0
            for k, g in self.gates.items()
            if k.startswith("head:")
        }
        ffns = {
            self._blocks[k][1]: g.detach().cpu() > 0
            for k, g in self.gates.items()
            if k.startswith("ffn:")
        }
        before = sum(p.numel() for p in self.model.parameters())
        anatomy = self.anatomy
        kept: dict[str, list[int]] = {}
        if heads:
            r = remove_heads(self.model, anatomy, heads)
            anatomy, kept = r.anatomy, {**kept, **{f"head:{k}": v for k, v in r.kept.items()}}
        if ffns:
            r = remove_ffn_units(self.model, anatomy, ffns)
            anatomy, kept = r.anatomy, {**kept, **{f"ffn:{k}": v for k, v in r.kept.items()}}
        self._anatomy = anatomy
        self.kept = kept
        after = sum(p.numel() for p in self.model.parameters())
        self.events.append(
            {"permanent": True, "parameters_before": before, "parameters_after": after}
        )
        if self.is_global_zero:
            log.info("%s: removed %s parameters (%s -> %s)", self.state_key, f"{before - after:,}",
                     f"{before:,}", f"{after:,}")  # fmt: skip
        return kept

    # ------------------------------------------------------------------ state and report
    def _summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, g in self.gates.items():
            kind, _, modality = self._blocks[k]
            e = out.setdefault(f"{kind}s/{modality}", {"total": 0, "removed": 0})
            e["total"] += g.numel()
            e["removed"] += int((g.detach() == 0).sum())
        for e in out.values():
            e["fraction"] = e["removed"] / e["total"]
        return out

    def state(self) -> dict[str, Any]:
        """Gates, importance accumulators, events done, kept indices."""
        return {
            "gates": {k: g.detach().cpu().clone() for k, g in self.gates.items()},
            "scores": {k: v.clone() for k, v in self.scores.items()},
            "done": list(self.done),
            "events": [dict(e) for e in self.events],
            "kept": {k: list(v) for k, v in self.kept.items()},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back the gates and put them on the model again."""
        if state.get("kept"):
            raise ValueError(
                f"{self.state_key}: this checkpoint was written after make_permanent removed "
                "heads/neurons; a resumed run cannot continue it (load the reduced weights "
                "into a model rebuilt with the kept indices instead)"
            )
        self.gates = {k: v.clone() for k, v in state["gates"].items()}
        self.scores = {k: v.clone() for k, v in (state.get("scores") or {}).items()}
        self.done = [int(s) for s in state.get("done") or []]
        self.events = [dict(e) for e in state.get("events") or []]
        if self._blocks:
            self._attach()

    def report(self) -> dict[str, Any]:
        """Removed fractions per kind and modality, events, kept indices."""
        if not self.gates:
            return {}
        blocks = {k: int((g.detach() != 0).sum()) for k, g in self.gates.items()}
        return {"removed": self._summary(), "kept_per_block": blocks, "events": list(self.events)}

    def report_rows(self) -> list[tuple[str, str]]:
        """Results-table rows: removed fraction of heads / neurons per modality."""
        return [
            (f"pruned {k}", f"{e['removed']}/{e['total']} ({e['fraction']:.2f})")
            for k, e in sorted(self._summary().items())
        ]
