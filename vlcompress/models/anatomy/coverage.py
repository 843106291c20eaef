"""How much of a model its anatomy declares: parameters per modality and what is left out."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from vlcompress.models.anatomy.specs import Modality

if TYPE_CHECKING:
    from vlcompress.models.anatomy.core import Anatomy

__all__ = ["CoverageReport", "coverage_of", "declared_modality"]


@dataclass(frozen=True)
class CoverageReport:
    """Declared versus total parameters of a model (tied parameters counted once).

    Attributes:
        model: the model's class name.
        total: every parameter.
        by_modality: parameters the anatomy assigns to each modality (layers, extra modules and
            weights; :attr:`Modality.HEAD` for the task head).
        uncovered: the largest parts the anatomy does not declare, as ``(module or parameter
            path, parameters)``, largest first.

    Example::

        report = anatomy.coverage(model)
        report.fraction      # 0.97
        str(report)          # a readable summary
    """

    model: str
    total: int
    by_modality: dict[Modality, int] = field(default_factory=dict)
    uncovered: list[tuple[str, int]] = field(default_factory=list)

    @property
    def declared(self) -> int:
        """Parameters the anatomy declares (every modality, the task head included)."""
        return sum(self.by_modality.values())

    @property
    def fraction(self) -> float:
        """``declared / total`` (1.0 for a model without parameters)."""
        return self.declared / self.total if self.total else 1.0

    def share(self, modality: Modality) -> float:
        """The share of all parameters declared as ``modality``."""
        return self.by_modality.get(Modality(modality), 0) / self.total if self.total else 0.0

    def largest_uncovered(self, n: int = 5) -> str:
        """The ``n`` largest undeclared parts, as ``"path (count), ..."``."""
        return ", ".join(f"{p} ({c:,})" for p, c in self.uncovered[:n]) or "nothing"

    def __str__(self) -> str:
        lines = [
            f"{self.model}: the anatomy declares {self.declared:,} of {self.total:,} "
            f"parameters ({self.fraction:.1%})"
        ]
        for m, count in self.by_modality.items():
            lines.append(f"  {m.value:<8} {count:>12,}  ({self.share(m):.1%})")
        if self.uncovered:
            lines.append("  not declared: " + self.largest_uncovered(8))
        return "\n".join(lines)


def declared_modality(anatomy: Anatomy) -> dict[str, Modality]:
    """Every declared path (layer, extra module or weight, task head) with its modality."""
    owners: dict[str, Modality] = {}
    for modality, paths in anatomy.extra_modules.items():
        owners.update(dict.fromkeys(paths, Modality(modality)))
    for layer in anatomy.layers:
        owners[layer.name] = layer.modality
    for modality, names in anatomy.extra_weights.items():
        owners.update(dict.fromkeys(names, Modality(modality)))
    owners.update(dict.fromkeys(anatomy.head_modules, Modality.HEAD))
    return owners


def _owner(name: str, owners: dict[str, Modality]) -> Modality | None:
    """The modality of the longest declared path that is ``name`` or one of its ancestors."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        hit = owners.get(".".join(parts[:end]))
        if hit is not None:
            return hit
    return None


def coverage_of(model: nn.Module, anatomy: Anatomy) -> CoverageReport:
    """Measure how much of ``model`` ``anatomy`` declares.

    Args:
        model: the model.
        anatomy: its anatomy.

    Returns:
        The report; ``uncovered`` names the largest wholly undeclared modules (or single
        parameters where a module is partly declared).
    """
    owners = declared_modality(anatomy)
    total = 0
    by_modality: dict[Modality, int] = defaultdict(int)
    size: dict[str, int] = defaultdict(int)
    covered: dict[str, int] = defaultdict(int)
    missing: list[tuple[str, int]] = []
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        modality = _owner(name, owners)
        parts = name.split(".")
        for end in range(1, len(parts)):
            size[".".join(parts[:end])] += n
            if modality is not None:
                covered[".".join(parts[:end])] += n
        if modality is None:
            missing.append((name, n))
        else:
            by_modality[modality] += n
    seen: dict[str, int] = {}
    for name, n in missing:
        parts = name.split(".")
        top = next(
            (".".join(parts[:e]) for e in range(1, len(parts)) if not covered[".".join(parts[:e])]),
            name,
        )
        seen[top] = size.get(top, n)
    order = [m for m in Modality if m in by_modality]
    return CoverageReport(
        model=type(model).__name__,
        total=total,
        by_modality={m: by_modality[m] for m in order},
        uncovered=sorted(seen.items(), key=lambda kv: -kv[1]),
    )
