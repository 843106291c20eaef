"""Preflight: everything knowable about an experiment before it trains, reported at once.

``python -m vlcompress validate`` runs it, and so does every run before it claims its folder,
so a mistake found here never leaves a failed run folder behind. It checks, beyond the
schema (:mod:`vlcompress.config.validate`):

* paths that must exist: option fields declared with :func:`vlcompress.options.local_path`
  (e.g. ``model.options.pretrained``), ``init_from``, and each data module's inputs (its
  ``missing_inputs(options)`` classmethod: data folders, region stores);
* each callback against the model it will compress: the model is built on the meta device
  (no memory, no weights read) and handed to the callback's ``preflight(model)`` (a
  :class:`~vlcompress.callbacks.CompressionCallback` method: anatomy, regions, teacher paths).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from vlcompress import registry
from vlcompress.config.schema import COMPONENT_SECTIONS, ComponentConfig, ExperimentConfig
from vlcompress.options import path_problem

__all__ = ["preflight"]

log = logging.getLogger(__name__)

_META_VOCAB, _META_ANSWERS = 64, 8
"""Stand-in sizes for the model built on the meta device (the data is not read here)."""


def _component_paths(kind: str, comp: ComponentConfig, where: str) -> list[str]:
    """Problems with the :func:`~vlcompress.options.local_path` options of one component."""
    options = registry.get(kind, comp.name).options
    given = comp.options or {}
    problems = []
    for f in dataclasses.fields(options):
        value = given.get(f.name)
        problem = path_problem(f.metadata, value)
        if problem:
            problems.append(f"{where}.options.{f.name}: {problem}")
        elif "path" in f.metadata and str(value).startswith("backbone:"):
            from vlcompress.backbones import resolve_backbone
            from vlcompress.config import ConfigError

            try:  # a built backbone's folder (the model reads its published layout there)
                resolve_backbone(str(value), f"{where}.options.{f.name}")
            except ConfigError as e:
                problems += e.errors
    return problems


def _data_problems(cfg: ExperimentConfig) -> list[str]:
    comp = registry.get("datamodule", cfg.data.name)
    check = getattr(comp.builder, "missing_inputs", None)
    if check is None:
        return []
    try:
        return list(check(comp.make_options(cfg.data.options)))
    except (TypeError, ValueError) as e:  # options the schema check already reported
        log.debug("preflight: data options not checkable: %s", e)
        return []


def _init_from_problems(cfg: ExperimentConfig, resuming: bool) -> list[str]:
    if not cfg.init_from or resuming:
        return []
    from vlcompress.config import ConfigError
    from vlcompress.utils.init_from import resolve_init_path

    try:
        resolve_init_path(cfg.init_from)
    except ConfigError as e:
        return list(e.errors)
    return []


def meta_model(cfg: ExperimentConfig) -> nn.Module:
    """The experiment's model built on the meta device: its structure without memory or
    weights (files the options name are not read; vocabulary and answers are stand-ins)."""
    comp = registry.get("model", cfg.model.name)
    options = dict(cfg.model.options or {})
    for f in dataclasses.fields(comp.options):
        if "path" in f.metadata:
            options[f.name] = None  # checked as paths above; a meta model reads no files
        elif f.name == "language_init":
            options[f.name] = "random"  # pretrained text weights: files the meta build skips
    with torch.device("meta"):
        return registry.build(
            "model", cfg.model.name, options, vocab_size=_META_VOCAB,
            num_answers=2 if options.get("head") == "pair" else _META_ANSWERS,  # True / False
        )  # fmt: skip


class _Task(nn.Module):
    """Stands for the task around the meta model, so that each callback picks its module as
    in a run (``model_attr``; by default the task's ``.model``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def _callback_problems(cfg: ExperimentConfig, resuming: bool) -> list[str]:
    if not cfg.callbacks:
        return []
    problems: list[str] = []
    built: list[tuple[int, Any]] = []
    for i, c in enumerate(cfg.callbacks):
        try:
            cb = registry.build("callback", c.name, c.options)
        except (TypeError, ValueError) as e:
            problems.append(f"callbacks[{i}].options: {e}")
            continue
        if hasattr(cb, "within_vlcompress_run"):
            cb.within_vlcompress_run = True
            cb.resuming_run = resuming
        if hasattr(cb, "preflight"):
            built.append((i, cb))
    if not built:
        return problems
    try:
        task = _Task(meta_model(cfg))
    except Exception as e:  # noqa: BLE001 - reported, the run itself would raise it again
        return problems + [f"model: cannot be built ({type(e).__name__}: {e})"]
    for i, cb in built:
        try:
            resolve = getattr(cb, "_resolve_model", lambda pl_module: pl_module.model)
            found = cb.preflight(resolve(task))
        except (TypeError, ValueError) as e:  # model_attr leads nowhere
            found = [str(e)]
        except Exception as e:  # noqa: BLE001 - a callback's own check must not hide the rest
            found = [f"its preflight check failed: {type(e).__name__}: {e}"]
        problems += [f"callbacks[{i}] ({cfg.callbacks[i].name}): {p}" for p in found]
    return problems


def preflight(cfg: ExperimentConfig, resuming: bool | None = None) -> list[str]:
    """Every problem of the validated experiment ``cfg`` that shows before training (see the
    module docstring), one line each; empty when it is ready to run.

    Args:
        cfg: the validated experiment.
        resuming: the run continues its own checkpoint, so ``init_from`` is not used and
            callbacks skip inputs only a fresh start reads (default:
            ``cfg.resume``).
    """
    problems: list[str] = []
    for section, kind in COMPONENT_SECTIONS.items():
        problems += _component_paths(kind, getattr(cfg, section), section)
    for i, c in enumerate(cfg.callbacks):
        problems += _component_paths("callback", c, f"callbacks[{i}]")
    resuming = cfg.resume if resuming is None else resuming
    problems += _init_from_problems(cfg, resuming)
    problems += _data_problems(cfg)
    problems += _callback_problems(cfg, resuming)
    return problems
