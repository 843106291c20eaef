"""Experiments -> validated configuration objects.

Three jobs, three files: :mod:`~vlcompress.config.schema` (the typed sections),
:mod:`~vlcompress.config.validate` (every problem at once, closest names, each component's
options checked against its registered dataclass) and :mod:`~vlcompress.config.load` (YAML
files with ``defaults:`` overlays and ``key=value`` overrides).
"""

from vlcompress.config.load import experiments_dir, list_experiments, load_experiment
from vlcompress.config.schema import (
    COMPONENT_SECTIONS,
    ComponentConfig,
    ExperimentConfig,
    OptimConfig,
    SchedulerConfig,
    SlurmConfig,
    SweepConfig,
    TrainerConfig,
)
from vlcompress.config.validate import ConfigError, validate

__all__ = [
    "COMPONENT_SECTIONS",
    "ComponentConfig",
    "ConfigError",
    "ExperimentConfig",
    "OptimConfig",
    "SchedulerConfig",
    "SlurmConfig",
    "SweepConfig",
    "TrainerConfig",
    "experiments_dir",
    "list_experiments",
    "load_experiment",
    "validate",
]
