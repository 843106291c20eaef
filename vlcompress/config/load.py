"""Loading experiments: YAML files with ``defaults:`` overlays and ``key=value`` overrides.

Experiments are YAML files (OmegaConf, no Hydra). A file may start with
``defaults: [base/a, base/b]``: those files are merged first, in order, then the file itself,
then command-line overrides; the result is validated (:func:`vlcompress.config.validate`).
"""

from __future__ import annotations

import difflib
import os
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlcompress.config.schema import ExperimentConfig
from vlcompress.config.validate import ConfigError, validate

__all__ = ["experiments_dir", "list_experiments", "load_experiment"]


def experiments_dir() -> Path:
    """Folder of experiment files, the first that exists of: ``$VLCOMPRESS_EXPERIMENTS``,
    ``./experiments``, the source tree's ``experiments/``, the installed package's
    ``vlcompress/experiments/``."""
    env = os.environ.get("VLCOMPRESS_EXPERIMENTS")
    if env:
        return Path(env)
    candidates = [
        Path.cwd() / "experiments",
        Path(__file__).resolve().parents[2] / "experiments",
        Path(str(resources.files("vlcompress"))) / "experiments",
    ]
    return next((c for c in candidates if (c / "default.yaml").is_file()), candidates[-1])


def list_experiments(root: Path | None = None) -> list[str]:
    """Names of the runnable experiments (base files excluded)."""
    root = root or experiments_dir()
    return sorted(
        str(p.relative_to(root).with_suffix(""))
        for p in root.rglob("*.yaml")
        if p.relative_to(root).parts[0] != "base"
    )


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf's own errors
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e).replace("\n", " ")
        raise ConfigError(
            [f"{where}{what}; fix the YAML syntax there (indentation, ':', brackets, quotes)"],
            f"cannot read {path}",
        ) from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError([f"{path} must hold a mapping at the top level"], str(path))
    return cfg


def _load_file(path: Path, root: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    if path in seen:
        raise ConfigError(
            [f"circular defaults: {' -> '.join(str(p) for p in (*seen, path))}"], str(path)
        )
    cfg = _read_yaml(path)
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
        avail = list_experiments(root) if root.is_dir() else []
        close = difflib.get_close_matches(name, avail, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            [
                f"unknown experiment {name!r} (no file {path}).{hint} Available in {root}: "
                f"{', '.join(avail) or '(none)'}; set VLCOMPRESS_EXPERIMENTS to another folder."
            ],
            "EXP",
        )
    cfg = _load_file(path, root)
    bad = [o for o in overrides or [] if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(
            [f"override {o!r} is not of the form key=value" for o in bad], "command line"
        )
    for o in overrides or []:  # one by one: "callbacks.1.options.sparsity=0.9" reaches a list item
        key, _, text = o.partition("=")
        try:
            value = OmegaConf.from_dotlist([f"v={text}"])["v"]
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except Exception as e:  # e.g. overriding a list item with a mapping
            raise ConfigError([f"cannot apply the override {o!r}: {e}"], "command line") from e
    if "name" not in cfg:
        cfg.name = (
            str(path.relative_to(root).with_suffix("")) if path.is_relative_to(root) else path.stem
        )
    return validate(cfg, source=f"experiment {name!r}"), cfg
