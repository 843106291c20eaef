"""``PruningCallback``: what the pruning callbacks share — targets, masks in checkpoints, DDP
agreement, the sparsity report.

Subclasses (:class:`~vlcompress.callbacks.magnitude_pruning.MagnitudePruning`,
:class:`~vlcompress.callbacks.mask_training.MaskTraining`) decide *which* weights survive; this
base finds the prunable weights through the anatomy, keeps the masks (bit-packed) in the
checkpoint so a resumed run continues with exactly the same masks, makes sure every DDP rank
holds the same masks, and reports target and actual sparsity per modality, layer and matrix.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vlcompress.callbacks.base import CompressionCallback
from vlcompress.compress.pruning import (
    PruningTarget,
    collect_targets,
    parse_sparsity,
    sparsity_report,
)
from vlcompress.models.contract import overall_rate_weights

__all__ = ["PruningCallback", "pack_mask", "unpack_mask"]

log = logging.getLogger(__name__)


def pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    """A bool mask as 1 bit per weight (``{"bits": uint8 tensor, "shape": [...]}``)."""
    bits = np.packbits(mask.detach().bool().cpu().numpy().reshape(-1))
    return {"bits": torch.from_numpy(bits), "shape": list(mask.shape)}


def unpack_mask(packed: Mapping[str, Any]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`."""
    shape = [int(s) for s in packed["shape"]]
    n = int(np.prod(shape)) if shape else 1
    flat = np.unpackbits(packed["bits"].numpy(), count=n).astype(bool)
    return torch.from_numpy(flat).reshape(shape)


def masks_digest(masks: Mapping[str, torch.Tensor]) -> str:
    """A short hash of a set of masks (equal masks give equal digests on every process)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(masks):
        h.update(name.encode())
        h.update(np.packbits(masks[name].detach().bool().cpu().numpy().reshape(-1)).tobytes())
    return h.hexdigest()


class PruningCallback(CompressionCallback):
    """Base of the unstructured pruning callbacks (see the module docstring).

    Args:
        sparsity: fraction of weights *zeroed* (0.9 keeps 10%), one number or per modality
            (``{"language": 0.6, "vision": 0.04, "cross": 0.6}``; a modality not named stays
            dense; ``"default"`` covers the ones not named).
        include: regular expressions; only matching prunable weights are pruned.
        exclude: regular expressions; matching weights are left dense.
        seed, model_attr, patterns, name: see :class:`CompressionCallback`.

    Raises:
        TypeError, ValueError: bad arguments (named in the message).
    """

    def __init__(
        self,
        sparsity: float | Mapping[str, float] = 0.5,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        seed: int | None = None,
        model_attr: Any = None,
        patterns: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(seed=seed, model_attr=model_attr, patterns=patterns, name=name)
        self.sparsity = parse_sparsity(sparsity, f"{type(self).__name__}: sparsity")
        for arg, value in (("include", include), ("exclude", exclude)):
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise TypeError(
                    f"{type(self).__name__}: {arg} must be a list of regular expressions; "
                    f"got {value!r}"
                )
        self.include, self.exclude = list(include), list(exclude)
        self.targets: list[PruningTarget] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.reached: dict[str, float] = {}  # sparsity the schedule has reached, per matrix
        self.events: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    def preflight(self, model: nn.Module) -> list[str]:
        """The anatomy's problems, per-modality targets naming a modality without prunable
        weights, bad ``include`` / ``exclude`` patterns, and nothing left to prune."""
        problems = super().preflight(model)
        anatomy = self.preflight_anatomy(model)
        if anatomy is None:
            return problems
        weights = anatomy.prunable_weights(model)
        has = sorted(m.value for m, params in weights.items() if params)
        opt = self.advise(lightning="sparsity", vlcompress="options.sparsity")
        for key in self.sparsity:
            if key != "default" and key not in has:
                problems.append(
                    f"{opt}[{key!r}]: {type(model).__name__} has no prunable weights of "
                    f"modality {key!r} (its prunable weights are in {has}); name those "
                    "modalities, or 'default'"
                )
        try:
            collect_targets(model, anatomy, self.sparsity, self.include, self.exclude)
        except ValueError as e:
            problems.append(str(e))
        return problems

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Find the model, its anatomy and the weights to prune.

        Raises:
            ValueError: the problems of :meth:`preflight`.
        """
        super().setup(trainer, pl_module, stage)
        if not self.targets:
            self.targets = collect_targets(
                self.model, self.anatomy, self.sparsity, self.include, self.exclude
            )
            self._overall_rate(overall_rate_weights(self.model))
            n = sum(t.numel for t in self.targets)
            if self.is_global_zero:
                log.info(
                    "%s: %d weight matrices (%s weights) to prune; targets %s",
                    self.state_key,
                    len(self.targets),
                    f"{n:,}",
                    self.sparsity,
                )

    def _overall_rate(self, names: Sequence[str]) -> None:
        """Weights a model names in ``overall_rate_weights`` (LXMERT's pooler, as seed 000)
        are pruned at the overall rate of the other weights, not their modality's."""
        special = [t for t in self.targets if t.name in set(names)]
        if not special or len({t.sparsity for t in self.targets}) == 1:
            return
        rest = [t for t in self.targets if t.name not in set(names)]
        total = sum(t.numel for t in rest)
        overall = sum(t.numel * t.sparsity for t in rest) / total
        for t in special:
            t.sparsity = overall

    @property
    def params(self) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of the pruned matrices."""
        return {t.name: t.param for t in self.targets}

    # ------------------------------------------------------------------ DDP
    def agree(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``masks`` as rank 0 has them, on every rank.

        The masks are computed from weights that DDP keeps equal, so ranks normally agree; a
        digest comparison (one broadcast of 32 characters) checks it, and only if some rank
        differs are rank 0's masks broadcast (with a warning).
        """
        if self.world_size == 1:
            return masks
        digest = masks_digest(masks)
        same = self.all_ranks(self.broadcast(digest) == digest)
        if same:
            return masks
        if self.is_global_zero:
            log.warning("%s: ranks computed different masks; using rank 0's", self.state_key)
        packed = self.broadcast({n: pack_mask(m) for n, m in masks.items()})
        return {n: unpack_mask(p).to(masks[n].device) for n, p in packed.items()}

    # ------------------------------------------------------------------ state
    def mask_state(self, masks: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """The masks (default :attr:`masks`), bit-packed, and the reached sparsities, for
        :meth:`state`."""
        masks = self.masks if masks is None else masks
        return {
            "masks": {n: pack_mask(m) for n, m in masks.items()},
            "reached": dict(self.reached),
            "events": [dict(e) for e in self.events],
        }

    def load_mask_state(self, state: Mapping[str, Any]) -> None:
        """Take back :meth:`mask_state` (the masks go to the parameters' devices)."""
        params = self.params if self.targets else {}
        masks = {}
        for n, packed in (state.get("masks") or {}).items():
            if params and n not in params:
                raise ValueError(
                    f"{self.state_key}: the checkpoint has a mask for {n!r}, which this run "
                    "does not prune; resume with the same sparsity/include/exclude settings"
                )
            m = unpack_mask(packed)
            if params:
                m = m.to(params[n].device)
            masks[n] = m
        self.masks = masks
        self.reached = {str(k): float(v) for k, v in (state.get("reached") or {}).items()}
        self.events = [dict(e) for e in state.get("events") or []]

    # ------------------------------------------------------------------ report
    def sparsity_report(self) -> dict[str, Any]:
        """Target and actual sparsity per matrix, layer, modality and overall."""
        return sparsity_report(self.targets, self.masks, self.reached or None)

    def log_report(self, when: str, layers: bool = False) -> None:
        """Log the per-modality summary (rank 0); with ``layers``, one line per layer too."""
        if not self.is_global_zero or not self.targets:
            return
        rep = self.sparsity_report()
        parts = [
            f"{m} {e['actual']:.4f} (target {e['target']:.4f})"
            for m, e in sorted(rep["modalities"].items())
        ]
        o = rep["overall"]
        log.info(
            "%s %s: sparsity %.4f (target %.4f) — %s",
            self.state_key,
            when,
            o["actual"],
            o["target"],
            ", ".join(parts),
        )
        if layers:
            for name, e in rep["layers"].items():
                log.info(
                    "%s   %-40s %12s weights  sparsity %.4f (target %.4f)",
                    self.state_key,
                    name,
                    f"{e['numel']:,}",
                    e["actual"],
                    e["target"],
                )

    def report(self) -> dict[str, Any]:
        """``results.json`` section: the sparsity report and the pruning events."""
        if not self.targets:
            return {}
        return {"sparsity": self.sparsity_report(), "events": list(self.events)}

    def report_rows(self) -> list[tuple[str, str]]:
        """Results-table rows: overall and per-modality actual sparsity (target)."""
        if not self.targets:
            return []
        rep = self.sparsity_report()
        rows = [
            ("sparsity", f"{rep['overall']['actual']:.4f} (target {rep['overall']['target']:.4f})")
        ]
        for m, e in sorted(rep["modalities"].items()):
            rows.append((f"sparsity/{m}", f"{e['actual']:.4f} (target {e['target']:.4f})"))
        return rows
