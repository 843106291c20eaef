"""``python -m vlcompress export <run>``: submodels of a slimmable run as standalone models.

The run folder's configuration rebuilds the data module and the model; the best checkpoint
gives the weights. Then, for the run's submodel space (its ``slimmable_training`` callback's,
else BST's triangle):

* ``--table`` profiles every submodel on its exported copy (parameters, MACs, FLOPs per
  example, CPU latency at batch 1 and a large batch), joins the run's per-submodel test
  accuracy from ``results.json``, and writes ``submodels.json`` / ``submodels.md`` in the run;
* ``width=... depth=...`` or ``budget=macs=5e8`` exports one submodel (the most accurate
  within the budget) to ``<run>/export/<submodel key>/`` and checks that the reloaded export
  gives the slimmed model's outputs.
"""

from __future__ import annotations

import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlcompress.compress.slimmable import Slimmable, Submodel, parse_space
from vlcompress.compress.submodels import (
    load_export,
    parse_budget,
    profile_submodels,
    save_export,
    select,
)
from vlcompress.config import load_experiment
from vlcompress.utils.flops import resize_batch
from vlcompress.utils.io import atomic_write_json, atomic_write_text

__all__ = ["export_from_run"]

log = logging.getLogger(__name__)


def _fraction(text: str, what: str) -> float:
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}={text!r}: give a fraction such as 0.5 or 1/3.") from None


def _space(raw: dict[str, Any]) -> list[Submodel]:
    for cb in raw.get("callbacks") or []:
        if cb.get("name") == "slimmable_training":
            return parse_space((cb.get("options") or {}).get("space", "triangle"))
    return parse_space("triangle")


def _tested(run: Path) -> dict[str, float]:
    path = run / "results.json"
    if not path.is_file():
        return {}
    import json

    results = json.loads(path.read_text())
    for key, entry in (results.get("callbacks") or {}).items():
        if key.split("[")[0] == "SlimmableTraining" and isinstance(entry, dict):
            return {r["submodel"]: r["accuracy"] for r in entry.get("test_submodels") or []}
    return {}


def _markdown(rows: list[dict[str, Any]], large: int) -> str:
    head = ("| submodel | test acc | params (M) | MACs (M) | FLOPs (M) | latency b1 (ms) | "
            f"latency b{large} (ms) |\n|---|---|---|---|---|---|---|\n")  # fmt: skip

    def f(r: dict[str, Any], k: str, scale: float = 1.0, nd: int = 2) -> str:
        v = r.get(k)
        return "" if v is None else f"{v / scale:.{nd}f}"

    body = "".join(
        f"| {r['submodel']} | {f(r, 'accuracy', nd=4)} | {f(r, 'parameters', 1e6)} | "
        f"{f(r, 'macs', 1e6, 1)} | {f(r, 'flops', 1e6, 1)} | {f(r, 'latency_b1_ms')} | "
        f"{f(r, 'latency_large_ms')} |\n"
        for r in rows
    )
    return head + body


def export_from_run(
    run: str | Path,
    *,
    width: str | None = None,
    depth: str | None = None,
    budget: str | None = None,
    table: bool = False,
    latency: bool = True,
    large_batch: int = 64,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Profile and / or export submodels of the slimmable run in ``run`` (see the module doc).

    The weights are the run's best checkpoint (chosen by the full model's validation
    accuracy), the same the run's per-submodel test table was measured with.

    Args:
        run: the run folder.
        width, depth: the submodel to export (fractions such as ``"1/2"``).
        budget: instead, the most accurate tested submodel within ``key=value[,key=value]``.
        table: profile every submodel into ``submodels.json`` / ``submodels.md``.
        latency: measure latency in the table.
        large_batch: the batch size of the second latency.
        out: the export folder (default ``<run>/export/<submodel key>``).

    Returns:
        ``{"table": rows}`` and / or ``{"export": folder, "record": ...}``.

    Raises:
        FileNotFoundError: no such run folder or checkpoint.
        ValueError: a bad width / depth / budget, or a budget nothing fits.
    """
    from vlcompress.run import build_datamodule, build_task
    from vlcompress.utils.init_from import resolve_init_path

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'} not found: give a vlcompress run folder.")
    if (width is None) != (depth is None):
        raise ValueError("give both width= and depth= (e.g. width=1/2 depth=1/3), or budget=.")
    cfg, raw_cfg = load_experiment(str(run / "config.yaml"))
    raw = OmegaConf.to_container(raw_cfg, resolve=True)
    dm = build_datamodule(cfg.data, cfg.seed)
    task = build_task(cfg, dm)
    ckpt = resolve_init_path(run)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    task.model.load_state_dict(model_state)  # strict: a mismatch must not export random weights
    model = task.model.eval()
    batch = next(iter(dm.test_dataloader()))
    one, big = resize_batch(batch, 1), resize_batch(batch, large_batch)
    slim = Slimmable(model)
    space = _space(raw)
    tested = _tested(run)
    result: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    if table or budget:
        lat = latency or (budget is not None and "latency" in budget)
        rows = profile_submodels(slim, space, one, big if lat else None, latency=lat)
        for r in rows:
            r["accuracy"] = tested.get(r["submodel"])
        result["table"] = rows
        if table:
            atomic_write_json(run / "submodels.json", {"batch_large": large_batch, "rows": rows})
            atomic_write_text(run / "submodels.md", _markdown(rows, large_batch))
    chosen: Submodel | None = None
    if budget is not None:
        if not tested:
            raise ValueError(
                f"budget= needs the per-submodel test accuracy in {run / 'results.json'} "
                "(a finished slimmable_training run); or give width= and depth=."
            )
        best = select([r for r in rows if r["accuracy"] is not None], parse_budget(budget))
        chosen = Submodel(best["width"], best["depth"])
        log.info("budget %s: %s (accuracy %.4f)", budget, best["submodel"], best["accuracy"])
    elif width is not None and depth is not None:
        chosen = Submodel(_fraction(width, "width"), _fraction(depth, "depth"))
    if chosen is not None:
        small = slim.export(chosen, one).eval()
        folder = Path(out) if out else run / "export" / chosen.key
        info = dm.info()
        record = {
            "submodel": chosen.name,
            "width": chosen.width,
            "depth": chosen.depth,
            "source_run": str(run),
            "source_checkpoint": str(ckpt),
            "test_accuracy": tested.get(chosen.name),
            "parameters": sum(p.numel() for p in small.parameters()),
            **(
                {"row": next((r for r in rows if r["submodel"] == chosen.name), None)}
                if rows
                else {}
            ),  # fmt: skip
        }
        save_export(
            small,
            folder,
            model_name=cfg.model.name,
            context={"vocab_size": info.vocab_size, "num_answers": len(info.answers)},
            record=record,
            experiment=raw,
        )
        again = load_export(folder)
        with torch.no_grad(), slim.submodel(chosen):
            diff = float((again(batch) - model(batch)).abs().max())
        record["reload_max_abs_diff"] = diff
        written = json.loads((folder / "export.json").read_text())  # + the model's digest
        atomic_write_json(folder / "export.json", {**written, "reload_max_abs_diff": diff})
        if not diff <= 1e-4:
            raise ValueError(
                f"the reloaded export in {folder} differs from the slimmed model by {diff:.3g} "
                "(max |logit| difference); the export is wrong, please report it."
            )
        result.update({"export": str(folder), "record": record})
    slim.detach()
    return result
