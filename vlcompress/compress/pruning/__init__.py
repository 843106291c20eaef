"""Unstructured and N:M pruning in pure torch: targets, exact masks, schedules, mask appliers.

The Lightning callbacks ``MagnitudePruning`` and ``MaskTraining`` (:mod:`vlcompress.callbacks`)
orchestrate these pieces; other code may use them directly.
"""

from vlcompress.compress.pruning.apply import (
    ForwardMasks,
    masked_weight,
    threshold_mask,
    zero_masked,
)
from vlcompress.compress.pruning.ranking import exact_keep_mask, group_masks, keep_count, nm_mask
from vlcompress.compress.pruning.schedule import SCHEDULES, PruningSchedule
from vlcompress.compress.pruning.sparsity import overall_sparsity, parse_sparsity, target_for
from vlcompress.compress.pruning.targets import PruningTarget, collect_targets, sparsity_report

__all__ = [
    "SCHEDULES",
    "ForwardMasks",
    "PruningSchedule",
    "PruningTarget",
    "collect_targets",
    "exact_keep_mask",
    "group_masks",
    "keep_count",
    "masked_weight",
    "nm_mask",
    "overall_sparsity",
    "parse_sparsity",
    "sparsity_report",
    "target_for",
    "threshold_mask",
    "zero_masked",
]
