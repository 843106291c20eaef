"""Pretrained backbones: recipe runs that later experiments start from.

Every file in ``experiments/backbones/`` is a backbone recipe (``backbones/<name>``); its run
folder, ``<backbones dir>/<name>`` (``$VLCOMPRESS_BACKBONES``, default ``runs/backbones``), is the
backbone. A later experiment names it with ``init_from: backbone:<name>`` (which resolves to that
folder's best checkpoint, after the usual ``init_from`` checks), and ``make backbones``
(``python -m vlcompress backbones``) trains those not finished yet — resuming an interrupted one,
skipping finished ones — and prints what each one scores next to its blind baselines.

Example::

    python -m vlcompress backbones --list            # what is built, and how well it sees
    python -m vlcompress backbones uniter_mini_easy_vqa
    python -m vlcompress train uniter_mini_effnet_easy_vqa optim.lr=1e-4 \\
        init_from=backbone:uniter_mini_easy_vqa      # a new stage from it
    python -m vlcompress train seed001_bst_uniter_mini_easy_vqa  # its teacher: the backbone
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlcompress.config.load import experiments_dir, list_experiments
from vlcompress.config.validate import ConfigError
from vlcompress.utils.init_from import BACKBONE_PREFIX

__all__ = [
    "BACKBONES_ENV",
    "BACKBONE_PREFIX",
    "BackboneStatus",
    "backbone_names",
    "backbone_output_dir",
    "backbone_status",
    "backbones_dir",
    "backbone_requirements",
    "build_backbones",
    "build_order",
    "resolve_backbone",
]

log = logging.getLogger(__name__)

BACKBONES_ENV = "VLCOMPRESS_BACKBONES"
_FOLDER = "backbones"


def backbones_dir() -> Path:
    """Where backbone run folders live: ``$VLCOMPRESS_BACKBONES``, else ``runs/backbones``."""
    return Path(os.environ.get(BACKBONES_ENV) or Path("runs") / _FOLDER)


def backbone_names(root: Path | None = None) -> list[str]:
    """The backbone recipes: the experiments under ``experiments/backbones/``."""
    prefix = f"{_FOLDER}/"
    return [e[len(prefix) :] for e in list_experiments(root) if e.startswith(prefix)]


def backbone_output_dir(experiment: str) -> Path | None:
    """The run folder of experiment ``backbones/<name>`` (``None`` for any other)."""
    prefix = f"{_FOLDER}/"
    if not experiment.startswith(prefix):
        return None
    return backbones_dir() / experiment[len(prefix) :]


@dataclass
class BackboneStatus:
    """Where a backbone stands.

    Attributes:
        name: the recipe's name (``experiments/backbones/<name>.yaml``).
        folder: its run folder.
        state: ``finished`` (``run.json`` says so and ``results.json`` exists), ``unfinished``
            (a run folder without a finished run: interrupted, failed or running) or
            ``missing`` (no run folder).
        results: the finished run's ``results.json`` (empty otherwise).
        resumable: the folder holds ``checkpoints/last.ckpt``.
    """

    name: str
    folder: Path
    state: str
    results: dict[str, Any] = field(default_factory=dict)
    resumable: bool = False

    def row(self) -> dict[str, Any]:
        """Accuracy, balanced accuracy, both blind baselines, the blind flag and the question
        types answered blind, training minutes (a finished backbone; ``None`` where unknown)."""
        r = self.results
        data, test, blind = r.get("data") or {}, r.get("test") or {}, r.get("blind") or {}
        wall = r.get("train_wall_time_s")
        return {
            "accuracy": test.get("accuracy"),
            "balanced_accuracy": test.get("balanced_accuracy"),
            "prior_baseline": data.get("prior_baseline"),
            "blind_balanced_baseline": data.get("blind_balanced_baseline"),
            "answers_without_image": blind.get("answers_without_image"),
            "blind_question_types": blind.get("blind_question_types") or [],
            "train_minutes": None if wall is None else wall / 60,
        }


def backbone_status(name: str) -> BackboneStatus:
    """The state of backbone ``name`` (see :class:`BackboneStatus`)."""
    folder = backbones_dir() / name
    if not folder.is_dir():
        return BackboneStatus(name, folder, "missing")
    resumable = (folder / "checkpoints" / "last.ckpt").is_file()
    try:
        status = json.loads((folder / "run.json").read_text()).get("status")
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError):
        return BackboneStatus(name, folder, "unfinished", resumable=resumable)
    if status != "finished":
        return BackboneStatus(name, folder, "unfinished", resumable=resumable)
    return BackboneStatus(name, folder, "finished", results, resumable)


def _build_hint(name: str) -> str:
    return (
        f"build it with `make backbones` (all of them) or `python -m vlcompress backbones "
        f"{name}` (this one)"
    )


def resolve_backbone(ref: str, what: str = "init_from") -> Path:
    """The run folder that ``backbone:<name>`` names, once that backbone is finished.

    Raises:
        ConfigError: no such recipe (the known ones are listed), or the backbone is not built
            (the message gives the command that builds it).
    """
    name = ref[len(BACKBONE_PREFIX) :].strip() if ref.startswith(BACKBONE_PREFIX) else ref
    known = backbone_names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            [
                f"{what}: no backbone recipe {name!r} (no file "
                f"{experiments_dir() / _FOLDER / name}.yaml).{hint} Known backbones: "
                f"{', '.join(known) or '(none)'}"
            ]
        )
    st = backbone_status(name)
    if st.state != "finished":
        where = "does not exist" if st.state == "missing" else "holds no finished run"
        raise ConfigError(
            [f"{what}: backbone {name!r} is not built yet ({st.folder} {where}); "
             f"{_build_hint(name)}"]
        )  # fmt: skip
    return st.folder


def _backbone_refs(value: Any) -> list[str]:
    """Every ``backbone:<name>`` string inside a (nested) configuration value."""
    if isinstance(value, str):
        return [value[len(BACKBONE_PREFIX) :].strip()] if value.startswith(BACKBONE_PREFIX) else []
    if isinstance(value, dict):
        return [r for v in value.values() for r in _backbone_refs(v)]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in _backbone_refs(v)]
    return []


def backbone_requirements(name: str) -> list[str]:
    """The backbones that recipe ``name`` starts from (``init_from: backbone:<x>``, a
    callback's ``teacher: backbone:<x>``, any ``backbone:`` reference in its configuration)."""
    from omegaconf import OmegaConf

    from vlcompress.config import load_experiment

    _, raw = load_experiment(f"{_FOLDER}/{name}")
    refs = _backbone_refs(OmegaConf.to_container(raw, resolve=True))
    return list(dict.fromkeys(r for r in refs if r != name))


def build_order(names: list[str]) -> list[str]:
    """``names`` with the backbones they start from first (those not named are added).

    Raises:
        ConfigError: a recipe names an unknown backbone, or recipes start from each other in a
            cycle.
    """
    known, order, visiting = set(backbone_names()), [], []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ConfigError([f"backbones start from each other in a cycle: {cycle}"])
        if name not in known:
            who = f"backbone {visiting[-1]!r} starts from backbone" if visiting else "no backbone"
            raise ConfigError(
                [f"{who} {name!r}, which has no recipe; known backbones: "
                 f"{', '.join(sorted(known)) or '(none)'}"]
            )  # fmt: skip
        visiting.append(name)
        for dep in backbone_requirements(name):
            visit(dep)
        visiting.pop()
        order.append(name)

    for name in names:
        visit(name)
    return order


def build_backbones(
    names: list[str] | None = None,
    overrides: list[str] | None = None,
    dry_run: bool = False,
) -> list[tuple[str, str]]:
    """Train every backbone in ``names`` (default: all) that is not finished yet, one after
    another, each as ``python -m vlcompress train backbones/<name>`` (``resume=true`` when its
    folder holds a checkpoint to continue). A backbone that starts from another one
    (``init_from: backbone:<x>``) comes after it, and ``<x>`` is built too; when one fails,
    those that start from it are not run.

    Args:
        names: the backbones to build (default: every recipe).
        overrides: ``key=value`` overrides passed to every run (``threads=2``, say).
        dry_run: only say what would run.

    Returns:
        ``(name, what happened)`` per backbone: ``finished before``, ``trained``,
        ``resumed``, ``would train`` / ``would resume``, or ``failed (exit N)``.

    Raises:
        ConfigError: an unknown backbone name.
    """
    known = backbone_names()
    names = list(names or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            [f"no backbone recipe {n!r}; known backbones: {', '.join(known) or '(none)'}"
             for n in unknown]
        )  # fmt: skip
    done: list[tuple[str, str]] = []
    failed: set[str] = set()
    for name in build_order(names):
        st = backbone_status(name)
        if st.state == "finished":
            done.append((name, "finished before"))
            continue
        blocked = [d for d in backbone_requirements(name) if d in failed]
        if blocked:
            failed.add(name)
            done.append((name, f"not run (needs {', '.join(blocked)})"))
            continue
        resume = st.state == "unfinished" and st.resumable
        args = [f"{_FOLDER}/{name}", *(overrides or [])]
        if resume:
            args.append("resume=true")
        if dry_run:
            done.append((name, "would resume" if resume else "would train"))
            continue
        log.info("backbone %s: %s (%s)", name, "resuming" if resume else "training", st.folder)
        code = subprocess.call([sys.executable, "-m", "vlcompress", "train", *args])
        if code != 0:
            failed.add(name)
        done.append((name, ("resumed" if resume else "trained") if code == 0 else f"failed (exit {code})"))  # fmt: skip
    return done
