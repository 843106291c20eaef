"""Lightning callbacks (installed as ``vlcompress.callbacks``): compression methods and guards.

Every callback derives from :class:`CompressionCallback` and talks to models only through
:mod:`vlcompress.models.anatomy`, so it works in other people's Lightning projects too, under
``lightning.pytorch`` and ``pytorch_lightning`` Trainers alike. Each registers itself
(``@register("callback", name)``) so experiments can list it by name.
"""

if __name__ != "vlcompress.callbacks":  # the folder imported as a top-level package
    raise ImportError(
        f"the callbacks/ folder is installed as the package vlcompress.callbacks; import it under that "
        f"name (from vlcompress.callbacks import MagnitudePruning), not as {__name__!r}: imported twice, every component in it "
        "would register twice"
    )


from vlcompress.callbacks.architecture_skipping import ArchitectureSkipping
from vlcompress.callbacks.base import (
    CompressionCallback,
    collect_report_rows,
    collect_reports,
)
from vlcompress.callbacks.effects import Effects
from vlcompress.callbacks.finite_loss_guard import FiniteLossGuard, NonFiniteLossError
from vlcompress.callbacks.magnitude_pruning import MagnitudePruning, masks_in_checkpoint
from vlcompress.callbacks.mask_training import MaskTraining
from vlcompress.callbacks.pruning_base import PruningCallback
from vlcompress.callbacks.slimmable_training import SlimmableTraining, distillation_loss
from vlcompress.callbacks.staged_freeze import StagedFreeze, modality_parameters
from vlcompress.callbacks.structured_pruning import StructuredPruning

__all__ = [
    "ArchitectureSkipping",
    "CompressionCallback",
    "Effects",
    "FiniteLossGuard",
    "MagnitudePruning",
    "MaskTraining",
    "NonFiniteLossError",
    "PruningCallback",
    "SlimmableTraining",
    "StagedFreeze",
    "StructuredPruning",
    "collect_report_rows",
    "collect_reports",
    "distillation_loss",
    "masks_in_checkpoint",
    "modality_parameters",
]
