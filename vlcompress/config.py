"""Experiments -> validated configuration objects.

Experiments are YAML files under ``experiments/`` (OmegaConf, no Hydra). A file may start with
``defaults: [base/a, base/b]``: those files are merged first, in order, then the file itself,
then command-line ``key=value`` overrides. The result is checked against the schema below in
one pass that reports *every* problem: unknown keys (with the closest valid names), wrong
types and bad values.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """One or more configuration problems; ``errors`` lists them all."""

    def __init__(self, errors: list[str], source: str = "configuration") -> None:
        self.errors = errors
        super().__init__(
            f"{source} has {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors)
        )


def _choices(*values: str) -> dict:
    return {"choices": values}


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass
class DataConfig:
    """Which benchmark and how to load it."""

    name: str = field(default="easy_vqa", metadata=_choices("easy_vqa"))
    data_dir: str | None = None
    split: str = field(default="standard", metadata=_choices("standard", "cp"))
    val_fraction: float = field(default=0.1, metadata=_range(0.0, 1.0, lo_open=True))
    cp_test_fraction: float = field(default=0.33, metadata=_range(0.0, 1.0, lo_open=True))
    cp_leak: float = field(default=0.1, metadata=_range(0.0, 0.5))
    batch_size: int = field(default=128, metadata=_range(1))
    eval_batch_size: int = field(default=512, metadata=_range(1))
    max_question_len: int = field(default=14, metadata=_range(1))
    num_workers: int = field(default=0, metadata=_range(0))
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    """A registered model and its options (fields of the model's config class)."""

    name: str = field(default="mcan_small", metadata={"choices_from": "models"})
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser."""

    name: str = field(default="adamw", metadata=_choices("adam", "adamw", "sgd"))
    lr: float = field(default=1e-4, metadata=_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.0, metadata=_range(0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    momentum: float = field(default=0.9, metadata=_range(0.0))
    grad_clip: float = field(default=0.0, metadata=_range(0.0))


@dataclass
class SchedulerConfig:
    """Learning-rate schedule (``step`` milestones are epochs)."""

    name: str = field(default="none", metadata=_choices("none", "step", "cosine", "warmup_cosine"))
    warmup_steps: int = field(default=0, metadata=_range(0))
    milestones: list[int] = field(default_factory=list)
    gamma: float = field(default=0.2, metadata=_range(0.0, lo_open=True))


@dataclass
class TaskConfig:
    """The task's loss."""

    loss: str = field(default="bce", metadata={"choices_from": "losses"})


@dataclass
class TrainerConfig:
    """Arguments passed to ``lightning.Trainer``."""

    max_epochs: int = field(default=10, metadata=_range(1))
    max_steps: int = -1
    max_time: str | None = None
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"  # noqa: UP007 - OmegaConf-friendly
    num_nodes: int = field(default=1, metadata=_range(1))
    strategy: str = "auto"
    precision: str = field(
        default="32-true",
        metadata=_choices("32-true", "16-mixed", "bf16-mixed", "bf16-true", "64-true"),
    )
    log_every_n_steps: int = field(default=50, metadata=_range(1))
    val_check_interval: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    limit_train_batches: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    limit_val_batches: float = field(default=1.0, metadata=_range(0.0))
    limit_test_batches: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    deterministic: bool = False


@dataclass
class ExperimentConfig:
    """A whole experiment."""

    name: str = "experiment"
    description: str = ""
    seed: int = 0
    output_dir: str | None = None
    resume: bool = False
    threads: int = field(default=0, metadata=_range(0))
    progress_bar: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    callbacks: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------- validation
def _registry(kind: str) -> list[str]:
    if kind == "models":
        from vlcompress.models import MODELS

        return sorted(MODELS)
    if kind == "losses":
        from vlcompress.losses import LOSSES

        return sorted(LOSSES)
    raise KeyError(kind)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(_check_type(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return isinstance(value, tp)


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    return f"valid keys: {', '.join(valid)}"


def _validate(cls: type, data: Any, path: str, errors: list[str]) -> None:
    if not isinstance(data, dict):
        errors.append(
            f"{path or 'config'}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}"
        )
        return
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            errors.append(f"{path}{key}: unknown key; {_suggest(str(key), sorted(fields))}")
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, where = data[name], hints[name], f"{path}{name}"
        if dataclasses.is_dataclass(tp):
            _validate(tp, value, f"{where}.", errors)
            continue
        if not _check_type(value, tp):
            errors.append(
                f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}"
            )
            continue
        meta = f.metadata
        choices = meta.get("choices") or (
            _registry(meta["choices_from"]) if "choices_from" in meta else None
        )
        if choices and value not in choices:
            errors.append(
                f"{where}: {value!r} is not one of {list(choices)}; {_suggest(str(value), list(choices)).replace('valid keys', 'allowed')}"
            )
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None and isinstance(value, (int, float)):
            if value < lo or (meta.get("lo_open") and value == lo):
                errors.append(
                    f"{where}: must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value}"
                )
        if hi is not None and isinstance(value, (int, float)) and value >= hi:
            errors.append(f"{where}: must be < {hi}, got {value}")


def _validate_cross(data: dict, errors: list[str]) -> None:
    """Checks that span several sections: model options and callbacks."""
    model = data.get("model") or {}
    if isinstance(model, dict) and isinstance(model.get("options"), dict):
        from vlcompress.models import MODEL_CONFIGS

        cfg_cls = MODEL_CONFIGS.get(model.get("name", ModelConfig.name))
        if cfg_cls is not None:
            _validate(cfg_cls, _tuples_to_lists(model["options"]), "model.options.", errors)
    cbs = data.get("callbacks") or []
    if isinstance(cbs, list):
        from vlcompress.callbacks import CALLBACKS

        for i, cb in enumerate(cbs):
            if not isinstance(cb, dict) or "name" not in cb:
                errors.append(f"callbacks[{i}]: expected a mapping with a 'name' key, got {cb!r}")
            elif cb["name"] not in CALLBACKS:
                errors.append(
                    f"callbacks[{i}].name: unknown callback {cb['name']!r}; {_suggest(cb['name'], sorted(CALLBACKS)).replace('valid keys', 'known')}"
                )


def _tuples_to_lists(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _build(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            tp = hints[f.name]
            kwargs[f.name] = (
                _build(tp, data[f.name]) if dataclasses.is_dataclass(tp) else data[f.name]
            )
    return cls(**kwargs)


def validate(cfg: DictConfig | dict, source: str = "configuration") -> ExperimentConfig:
    """Check ``cfg`` against the schema and build an :class:`ExperimentConfig`.

    Raises:
        ConfigError: listing every problem found.
    """
    try:
        data = (
            OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        )
    except Exception as e:  # interpolation errors and the like
        raise ConfigError([f"cannot resolve the configuration: {e}"], source) from e
    data.pop("defaults", None)
    errors: list[str] = []
    _validate(ExperimentConfig, data, "", errors)
    _validate_cross(data, errors)
    if errors:
        raise ConfigError(errors, source)
    return _build(ExperimentConfig, data)


# ---------------------------------------------------------------------- loading
def experiments_dir() -> Path:
    """Folder of experiment files: ``$VLCOMPRESS_EXPERIMENTS``, ``./experiments`` or the
    source tree's ``experiments/``."""
    env = os.environ.get("VLCOMPRESS_EXPERIMENTS")
    if env:
        return Path(env)
    cwd = Path.cwd() / "experiments"
    if cwd.is_dir():
        return cwd
    return Path(__file__).resolve().parents[1] / "experiments"


def list_experiments(root: Path | None = None) -> list[str]:
    """Names of the runnable experiments (base files excluded)."""
    root = root or experiments_dir()
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if p.relative_to(root).parts[0] != "base"
    )


def _load_file(path: Path, root: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        raise ConfigError(
            [f"circular defaults: {' -> '.join(str(p) for p in (*seen, path))}"], str(path)
        )
    cfg = OmegaConf.load(path)
    defaults = cfg.pop("defaults", []) or []
    merged = OmegaConf.create()
    for d in defaults:
        dpath = root / f"{d}.yaml"
        if not dpath.is_file():
            raise ConfigError([f"defaults entry {d!r}: no file {dpath}"], str(path))
        merged = OmegaConf.merge(merged, _load_file(dpath, root, (*seen, path)))
    return OmegaConf.merge(merged, cfg)


def load_experiment(
    name: str, overrides: list[str] | None = None, root: Path | None = None
) -> tuple[ExperimentConfig, DictConfig]:
    """Load experiment ``name`` (or a path to a YAML file), apply ``key=value`` overrides,
    validate. Returns the typed config and the merged OmegaConf tree.

    Raises:
        ConfigError: unknown experiment (the available ones are listed), malformed overrides
            or any schema problem (all reported at once).
    """
    root = root or experiments_dir()
    path = Path(name) if name.endswith((".yaml", ".yml")) else root / f"{name}.yaml"
    if not path.is_file():
        avail = list_experiments(root)
        close = difflib.get_close_matches(name, avail, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            [f"unknown experiment {name!r} (no file {path}).{hint} Available: {', '.join(avail)}"],
            "EXP",
        )
    cfg = _load_file(path, root)
    bad = [o for o in overrides or [] if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(
            [f"override {o!r} is not of the form key=value" for o in bad], "command line"
        )
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    if "name" not in cfg:
        cfg.name = (
            str(path.relative_to(root).with_suffix("")) if path.is_relative_to(root) else path.stem
        )
    return validate(cfg, source=f"experiment {name!r}"), cfg
