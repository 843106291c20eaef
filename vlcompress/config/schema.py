"""The experiment schema: typed dataclasses for every section of an experiment file.

Components (data module, model, loss, task, callbacks) all have the same shape,
``{name: <registered name>, options: {...}}``; their options are checked against each
component's own options dataclass (see :mod:`vlcompress.registry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from vlcompress.options import choices, in_range

__all__ = [
    "ComponentConfig",
    "ExperimentConfig",
    "OptimConfig",
    "SchedulerConfig",
    "SlurmConfig",
    "SweepConfig",
    "TrainerConfig",
    "COMPONENT_SECTIONS",
]


@dataclass
class ComponentConfig:
    """A registered component and its options.

    Attributes:
        name: the registered name (``make list`` / :func:`vlcompress.registry.names`).
        options: fields of the component's options dataclass.
    """

    name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser."""

    name: str = field(default="adamw", metadata=choices("adam", "adamw", "sgd"))
    lr: float = field(default=1e-4, metadata=in_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=in_range(0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    momentum: float = field(default=0.9, metadata=in_range(0.0))
    grad_clip: float = field(default=0.0, metadata=in_range(0.0))
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Parameter-name regex -> learning-rate multiplier (the first matching pattern wins), e.g.
    ``{'lxmert\\.(embeddings|encoder\\.layer)\\.': 0.1}`` (single quotes in YAML: backslashes
    stay as they are): pretrained layers at a tenth of the rate of the fresh ones. Every pattern
    must match a trainable parameter."""


@dataclass
class SchedulerConfig:
    """Learning-rate schedule (``step`` milestones are epochs)."""

    name: str = field(default="none", metadata=choices("none", "step", "cosine", "warmup_cosine"))
    warmup_steps: int = field(default=0, metadata=in_range(0))
    milestones: list[int] = field(default_factory=list)
    gamma: float = field(default=0.2, metadata=in_range(0.0, lo_open=True))


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer`` (``log_every_n_steps: null``: about 50
    points over the run, at most every 50 steps)."""

    max_epochs: int = field(default=10, metadata=in_range(1))
    max_steps: int = -1
    max_time: str | None = None
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"  # noqa: UP007 - OmegaConf-friendly
    num_nodes: Union[int, str] = "auto"  # noqa: UP007 - 'auto': from Slurm / torchrun, else 1
    strategy: str = "auto"
    precision: str = field(
        default="32-true",
        metadata=choices("32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"),
    )
    log_every_n_steps: int | None = field(default=None, metadata=in_range(1))
    val_check_interval: float = field(default=1.0, metadata=in_range(0.0, lo_open=True))
    limit_train_batches: float = field(default=1.0, metadata=in_range(0.0, lo_open=True))
    limit_val_batches: float = field(default=1.0, metadata=in_range(0.0))
    limit_test_batches: float = field(default=1.0, metadata=in_range(0.0, lo_open=True))
    deterministic: bool = False


@dataclass
class SlurmConfig:
    """Where and how a sweep's points run (submitit; a Slurm job array on a cluster).

    Attributes:
        executor: ``auto`` (Slurm when ``sbatch`` is on the PATH, else local), ``slurm`` or
            ``local`` (the points run one after another on this machine).
        partition: Slurm partition (``None``: the cluster's default).
        time: wall-clock limit per point, ``HH:MM:SS`` or ``D-HH:MM:SS``.
        nodes: nodes per point (multi-node DDP: also set ``trainer.num_nodes``).
        tasks_per_node: processes per node (= ``trainer.devices``).
        gpus_per_node: GPUs per node (0 on CPU clusters).
        cpus_per_task: CPU cores per process.
        mem_gb: memory per node in GB (``None``: the cluster's default).
        array_parallelism: at most this many points run at once.
        additional: any other sbatch options, e.g. ``{account: myproj, qos: high}``.
    """

    executor: str = field(default="auto", metadata=choices("auto", "slurm", "local"))
    partition: str | None = None
    time: str = "01:00:00"
    nodes: int = field(default=1, metadata=in_range(1))
    tasks_per_node: int = field(default=1, metadata=in_range(1))
    gpus_per_node: int = field(default=0, metadata=in_range(0))
    cpus_per_task: int = field(default=2, metadata=in_range(1))
    mem_gb: int | None = None
    array_parallelism: int = field(default=64, metadata=in_range(1))
    additional: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepConfig:
    """A hyper-parameter sweep over this experiment (``make sweep EXP=...``); empty = none.

    Attributes:
        grid: config key -> list of values; every combination is a point.
        points: explicit points (each a mapping of config key -> value), combined with the grid;
            a point's own ``seeds: [...]`` replace ``seeds`` for that point.
        seeds: every point runs once per seed (``seed=`` override); empty = the experiment's.
        metric: the results.json value reported and plotted (dotted path).
        output_dir: the sweep folder (default ``runs/<experiment>/sweep``).
        slurm: where the points run.
    """

    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    metric: str = "test.accuracy"
    output_dir: str | None = None
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


COMPONENT_SECTIONS: dict[str, str] = {
    "data": "datamodule",
    "model": "model",
    "loss": "loss",
    "task": "task",
}
"""Experiment sections holding one component, and the registry kind of each
(``callbacks`` holds a list of ``callback`` components)."""


@dataclass
class ExperimentConfig:
    """A whole experiment.

    ``init_from`` (a run folder or a ``.ckpt`` file) starts a new pipeline stage from that
    run's model weights with a fresh optimiser and step counter; ``resume`` wins over it (see
    :mod:`vlcompress.utils.init_from`). ``init_grow: true`` lets that checkpoint be a shallower
    model of the same kind: its layers go where this model's submodel of that depth keeps them,
    the other layers keep their fresh initialisation (depth growth).
    """

    name: str = "experiment"
    description: str = ""
    seed: int = 0
    output_dir: str | None = None
    resume: bool = False
    init_from: str | None = None
    init_grow: bool = False
    overwrite: bool = False
    threads: int = field(default=0, metadata=in_range(0))
    progress_bar: bool = True
    data: ComponentConfig = field(default_factory=lambda: ComponentConfig("easy_vqa"))
    model: ComponentConfig = field(default_factory=lambda: ComponentConfig("mcan_small"))
    loss: ComponentConfig = field(default_factory=lambda: ComponentConfig("bce"))
    task: ComponentConfig = field(default_factory=lambda: ComponentConfig("vqa"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: list[ComponentConfig] = field(default_factory=list)
    sweep: SweepConfig = field(default_factory=SweepConfig)
