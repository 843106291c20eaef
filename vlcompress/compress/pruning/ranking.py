"""Which weights survive: exact top-k masks, per matrix or over a group, and N:M patterns.

Every function here is deterministic: equal inputs give equal masks on every process (ties are
broken by position), so DDP ranks holding equal weights agree without communicating.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["exact_keep_mask", "group_masks", "keep_count", "nm_mask"]


def keep_count(numel: int, sparsity: float) -> int:
    """How many of ``numel`` weights a ``sparsity`` (fraction zeroed) keeps: ``numel -
    round(sparsity * numel)``."""
    return numel - int(round(sparsity * numel))


def exact_keep_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping exactly the ``keep`` highest ``scores`` (ties: lower index first).

    Args:
        scores: any shape; compared flattened.
        keep: how many to keep, ``0 <= keep <= scores.numel()``.

    Returns:
        A bool tensor shaped like ``scores``.
    """
    flat = scores.detach().reshape(-1).float()
    n = flat.numel()
    if not 0 <= keep <= n:
        raise ValueError(f"keep must be in [0, {n}]; got {keep}")
    if keep == n:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - keep).values  # the largest pruned score
    mask = flat > threshold
    missing = keep - int(mask.sum())
    if missing > 0:  # ties at the threshold: take the first ones
        tied = torch.nonzero(flat == threshold).reshape(-1)[:missing]
        mask[tied] = True
    return mask.reshape(scores.shape)


def group_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: Mapping[str, float],
    groups: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact masks for several matrices, ranked per matrix or over groups of matrices.

    Args:
        scores: ``{name: importance}`` (higher survives; already-pruned weights should carry
            a score below every live one, e.g. ``-1`` for magnitudes).
        sparsity: ``{name: fraction zeroed}``; matrices in one group must share it.
        groups: ``{name: group}``: the matrices of a group are ranked together (global
            ranking); ``None``: each matrix holds exactly its own sparsity.

    Returns:
        ``{name: bool mask}`` on the scores' devices.
    """
    if groups is None:
        return {
            n: exact_keep_mask(s, keep_count(s.numel(), sparsity[n])) for n, s in scores.items()
        }
    members: dict[str, list[str]] = {}
    for name in scores:
        members.setdefault(groups[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for names in members.values():
        rates = {sparsity[n] for n in names}
        if len(rates) != 1:
            raise ValueError(f"matrices ranked together need one sparsity; got {sorted(rates)}")
        flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
        mask = exact_keep_mask(flat, keep_count(flat.numel(), rates.pop()))
        start = 0
        for n in names:
            size = scores[n].numel()
            out[n] = mask[start : start + size].reshape(scores[n].shape).to(scores[n].device)
            start += size
    return out


def nm_mask(
    weight: torch.Tensor, n: int = 2, m: int = 4, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """N:M mask: in every run of ``m`` consecutive inputs of a row, keep the ``n`` largest.

    The 2:4 pattern is what ``torch.sparse.to_sparse_semi_structured`` accelerates on GPUs.

    Args:
        weight: ``(out_features, in_features)``; ``in_features`` divisible by ``m``.
        n, m: keep ``n`` of every ``m``.
        scores: importance (default ``|weight|``).

    Raises:
        ValueError: for ``n > m`` or an input size not divisible by ``m``.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M pruning needs 0 < n <= m; got {n}:{m}")
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(
            f"N:M pruning needs a 2-D weight whose input size is divisible by m={m}; got shape "
            f"{tuple(weight.shape)}; exclude this matrix (exclude=[...]) or use unstructured"
        )
    s = (weight.detach().abs() if scores is None else scores.detach()).float()
    blocks = s.reshape(-1, m)
    order = torch.argsort(blocks, dim=1, descending=True, stable=True)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(weight.shape)


def unit_norms(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each unit over several ``(units, ...)`` views of its weights."""
    return torch.sqrt(sum(p.detach().float().pow(2).reshape(p.shape[0], -1).sum(1) for p in parts))
