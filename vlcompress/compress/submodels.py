"""Submodels of a slimmable model: their cost, the best one under a budget, a standalone export.

* :func:`profile_submodels` — parameters, MACs / FLOPs (one example) and measured latency (batch
  1 and a large batch) of every submodel, on its *exported* (physically smaller) copy;
* :func:`select` — the most accurate submodel whose cost fits a budget;
* :func:`save_export` / :func:`load_export` — a submodel as its own folder (``model.pt`` state
  dict + ``config.yaml`` with the smaller model's options + ``export.json``), loaded back with
  nothing but the registry: no slimming machinery.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlcompress.compress.slimmable import Slimmable, Submodel, config_attribute

__all__ = [
    "BUDGET_KEYS",
    "load_export",
    "parse_budget",
    "profile_submodels",
    "save_export",
    "select",
]

log = logging.getLogger(__name__)

BUDGET_KEYS = ("parameters", "macs", "flops", "latency_b1_ms", "latency_large_ms")
"""Costs a budget may bound (latency in milliseconds)."""


def profile_submodels(
    slim: Slimmable,
    space: Sequence[Submodel],
    example: Any,
    large: Any | None = None,
    *,
    latency: bool = True,
    repeats: int = 10,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Cost of every submodel of ``space``, measured on its exported copy.

    Args:
        slim: the slimmable model.
        space: the submodels.
        example: a one-example input (``model(example)``; MACs are per this input).
        large: a large-batch input for the second latency (``None``: skip it).
        latency: measure latency at all.
        repeats: timed calls per latency (the median is reported).
        device: where latency is measured.

    Returns:
        One row per submodel: ``submodel``, ``width``, ``depth``, ``parameters``, ``macs``,
        ``flops`` and, when measured, ``latency_b1_ms`` / ``latency_large_ms``.
    """
    from vlcompress.utils.flops import count_compute, measure_latency

    rows = []
    for sub in space:
        small = slim.export(sub, example).eval()
        compute = count_compute(small, example)
        row: dict[str, Any] = {
            "submodel": sub.name,
            "width": sub.width,
            "depth": sub.depth,
            "parameters": sum(p.numel() for p in small.parameters()),
            "macs": compute.macs,
            "flops": compute.flops,
        }
        if latency:
            small.to(device)
            for key, x in (("latency_b1_ms", example), ("latency_large_ms", large)):
                if x is not None:
                    x = _to(x, device)
                    seconds = measure_latency(
                        lambda x=x, m=small: m(x), repeats=repeats, device=device
                    )
                    row[key] = round(1e3 * seconds, 3)
        rows.append(row)
        log.info("%s: %s", sub.name, {k: v for k, v in row.items() if k != "submodel"})
    return rows


def _to(x: Any, device: torch.device | str) -> Any:
    """``x`` (a tensor, a dataclass batch, or a container of them) on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        changes = {f.name: _to(getattr(x, f.name), device) for f in dataclasses.fields(x)}
        return dataclasses.replace(x, **changes)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def parse_budget(text: str) -> dict[str, float]:
    """``"macs=5e8"`` or ``"parameters=2e7,latency_b1_ms=5"`` -> ``{key: bound}``.

    Raises:
        ValueError: for an unknown key (the allowed ones are listed) or a bad number.
    """
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in BUDGET_KEYS:
            raise ValueError(
                f"budget {part!r}: write key=value with key one of {list(BUDGET_KEYS)}, "
                "e.g. macs=5e8 or parameters=2e7,latency_b1_ms=5."
            )
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"budget {part!r}: {value!r} is not a number.") from None
    if not out:
        raise ValueError("empty budget; e.g. macs=5e8.")
    return out


def select(
    rows: Iterable[Mapping[str, Any]], budget: Mapping[str, float], metric: str = "accuracy"
) -> dict[str, Any]:
    """The row with the highest ``metric`` among those within every bound of ``budget``
    (ties: the cheaper in MACs).

    Raises:
        ValueError: when a row lacks a budgeted cost or the metric, or nothing fits (the
            cheapest submodel's costs are named).
    """
    rows = [dict(r) for r in rows]
    if not rows:
        raise ValueError("no submodels to select from.")
    for key in (*budget, metric):
        missing = [r.get("submodel") for r in rows if r.get(key) is None]
        if missing:
            raise ValueError(
                f"select: submodels {missing} have no {key!r}; profile them first (latency "
                "keys need profile_submodels(latency=True))."
            )
    fits = [r for r in rows if all(r[k] <= v for k, v in budget.items())]
    if not fits:
        cheapest = min(rows, key=lambda r: tuple(r[k] for k in budget))
        costs = {k: cheapest[k] for k in budget}
        raise ValueError(
            f"no submodel fits the budget {dict(budget)}; the cheapest, {cheapest['submodel']}, "
            f"costs {costs}."
        )
    return max(fits, key=lambda r: (r[metric], -r.get("macs", 0)))


def save_export(
    model: nn.Module,
    folder: str | Path,
    *,
    model_name: str,
    context: Mapping[str, Any],
    record: Mapping[str, Any],
    experiment: Mapping[str, Any] | None = None,
) -> Path:
    """Write an exported submodel as its own folder (atomically per file).

    Args:
        model: the exported (physically smaller) model; its ``config`` (a dataclass) holds the
            options that rebuild it.
        folder: where to write.
        model_name: its registry name (e.g. ``mcan_small``).
        context: the builder's context arguments (``vocab_size``, ``num_answers``).
        record: what to record in ``export.json`` (submodel, costs, accuracy, source).
        experiment: the source run's configuration; written with the new model options as
            ``experiment.yaml`` (for evaluating the export with the same data).

    Returns:
        The folder.

    Raises:
        TypeError: for a model without a dataclass ``config``.
    """
    from omegaconf import OmegaConf

    from vlcompress.utils.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    attr = config_attribute(model)
    if attr is None:
        raise TypeError(
            f"save_export needs a model with dataclass options (ours: .config / .options); "
            f"{type(model).__name__} has none: save its state_dict and rebuild it with its own "
            "library instead."
        )
    config = getattr(model, attr)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = _plain(asdict(config))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    data = buffer.getvalue()
    atomic_write_bytes(folder / "model.pt", data)
    spec = {"model": {"name": model_name, "options": options}, "context": dict(context)}
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(spec)))
    if experiment is not None:
        exp = dict(experiment)
        exp["model"] = {"name": model_name, "options": options}
        exp["callbacks"] = [c for c in exp.get("callbacks") or []
                            if c.get("name") != "slimmable_training"]  # fmt: skip
        exp["init_from"] = None  # the export's weights are in model.pt (load_export)
        atomic_write_text(folder / "experiment.yaml", OmegaConf.to_yaml(OmegaConf.create(exp)))
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_json(folder / "export.json", {**_plain(dict(record)), "model_sha256": digest})
    return folder


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def load_export(folder: str | Path) -> nn.Module:
    """A model exported by :func:`save_export`, rebuilt from the registry and its weights.

    Raises:
        FileNotFoundError: when ``config.yaml`` or ``model.pt`` is missing.
    """
    from omegaconf import OmegaConf

    from vlcompress import registry

    folder = Path(folder)
    for name in ("config.yaml", "model.pt"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} is missing: not an export folder (write one with "
                "`python -m vlcompress export <run> width=... depth=...`)."
            )
    spec = OmegaConf.to_container(OmegaConf.load(folder / "config.yaml"), resolve=True)
    model = registry.build(
        "model", spec["model"]["name"], spec["model"]["options"], **spec["context"]
    )
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
