"""What may be pruned: the anatomy's prunable weights, filtered, each with its modality and layer.

By default (as seed 000) every linear weight inside the layers, the word embeddings and the
visual input projections (whatever the model's anatomy declares as ``extra_weights``); never
biases, LayerNorms, position / type embeddings or the task head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from vlcompress.compress.pruning.ranking import keep_count
from vlcompress.compress.pruning.sparsity import target_for
from vlcompress.models.anatomy import Anatomy

__all__ = ["PruningTarget", "collect_targets", "sparsity_report"]


@dataclass
class PruningTarget:
    """One maskable weight matrix.

    Attributes:
        name: parameter name in the model.
        modality: ``language``, ``vision`` or ``cross``.
        layer: the anatomy layer holding it (``""`` for inputs such as embeddings).
        param: the model's parameter.
        sparsity: its final target (fraction zeroed).
    """

    name: str
    modality: str
    layer: str
    param: nn.Parameter
    sparsity: float

    @property
    def numel(self) -> int:
        """Number of weights."""
        return self.param.numel()


def collect_targets(
    model: nn.Module,
    anatomy: Anatomy,
    sparsity: Mapping[str, float],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[PruningTarget]:
    """The prunable weights of ``model`` with their modality, layer and target sparsity.

    Args:
        model: the model.
        anatomy: its anatomy.
        sparsity: :func:`~vlcompress.compress.pruning.sparsity.parse_sparsity`'s output; a
            modality without a target is left dense.
        include: regular expressions; when given, only names matching one are kept.
        exclude: regular expressions; names matching one are dropped.

    Raises:
        ValueError: a bad regular expression, or nothing left to prune (naming what was
            available and the filters).
    """
    try:
        inc = [re.compile(p) for p in include]
        exc = [re.compile(p) for p in exclude]
    except re.error as e:
        raise ValueError(f"bad include/exclude pattern {e.pattern!r}: {e}") from e
    out: list[PruningTarget] = []
    available = 0
    for modality, params in anatomy.prunable_weights(model).items():
        target = target_for(sparsity, modality.value)
        for name, param in params.items():
            available += 1
            if target is None or (inc and not any(p.search(name) for p in inc)):
                continue
            if any(p.search(name) for p in exc):
                continue
            layer = anatomy.layer_of(name)
            out.append(
                PruningTarget(name, modality.value, layer.name if layer else "", param, target)
            )
    if not out:
        raise ValueError(
            f"nothing to prune: the anatomy declares {available} prunable weight matrices but "
            f"none is left after sparsity={dict(sparsity)}, include={list(include)}, "
            f"exclude={list(exclude)}; check the modality names and the patterns"
        )
    return out


def sparsity_report(
    targets: Sequence[PruningTarget],
    masks: Mapping[str, torch.Tensor],
    reached: Mapping[str, float] | None = None,
) -> dict:
    """Target and actual sparsity per matrix, per layer, per modality and overall.

    Args:
        targets: the pruned matrices.
        masks: ``{name: bool/0-1 mask}`` (a matrix without a mask counts as dense).
        reached: ``{name: the sparsity the schedule has reached so far}`` (default the final
            targets).

    Returns:
        ``{"overall": {...}, "modalities": {m: {...}}, "layers": {l: {...}},
        "matrices": {name: {...}}}``, each entry with ``numel``, ``zeros``, ``target`` and
        ``actual`` (fractions zeroed).
    """

    def add(bucket: dict, key: str, numel: int, zeros: int, target_zeros: float) -> None:
        e = bucket.setdefault(key, {"numel": 0, "zeros": 0, "_target": 0.0})
        e["numel"] += numel
        e["zeros"] += zeros
        e["_target"] += target_zeros

    matrices: dict = {}
    layers: dict = {}
    modalities: dict = {}
    overall: dict = {}
    for t in targets:
        mask = masks.get(t.name)
        zeros = 0 if mask is None else int(t.numel - int(mask.detach().bool().sum()))
        goal = t.sparsity if reached is None else reached.get(t.name, t.sparsity)
        target_zeros = t.numel - keep_count(t.numel, goal)
        matrices[t.name] = {
            "modality": t.modality,
            "layer": t.layer,
            "numel": t.numel,
            "zeros": zeros,
            "target": target_zeros / t.numel,
            "actual": zeros / t.numel,
        }
        add(layers, t.layer or "(inputs)", t.numel, zeros, target_zeros)
        add(modalities, t.modality, t.numel, zeros, target_zeros)
        add(overall, "all", t.numel, zeros, target_zeros)
    for bucket in (layers, modalities, overall):
        for e in bucket.values():
            e["target"] = e.pop("_target") / e["numel"]
            e["actual"] = e["zeros"] / e["numel"]
    return {
        "overall": overall.get("all", {"numel": 0, "zeros": 0, "target": 0.0, "actual": 0.0}),
        "modalities": modalities,
        "layers": layers,
        "matrices": matrices,
    }
