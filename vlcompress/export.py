"""``python -m vlcompress export <run>``: submodels of a slimmable run as standalone models.

The run must have trained with the ``slimmable_training`` callback (only then were its
submodels trained); its configuration rebuilds the data module and the model, its best
checkpoint gives the weights, and its callback's space lists the submodels:

* ``--table`` profiles every submodel on its exported copy (parameters, MACs, FLOPs per
  example, CPU latency at batch 1 and a large batch: median and p10-p90 of repeated calls),
  joins the run's per-submodel *validation* accuracy (and test accuracy, for information only),
  and writes ``submodels.json`` / ``submodels.md`` in the run;
* ``width=... depth=...`` exports that submodel of the space, ``budget=macs=1e7`` the one
  with the best validation accuracy within the budget (never chosen on the test split), to
  ``<run>/export/<submodel key>/``, checks that the reloaded export gives the slimmed model's
  outputs, and stores the answer list and question encoding with it
  (:class:`~vlcompress.compress.submodels.ExportedModel` answers questions on its own).

``--separate FOLDER ...`` compares the run's submodels with models of the same shapes trained on
their own (run folders, or folders of them such as a sweep): each finished run is matched to the
submodel with its parameter count and MACs, and ``slimmable_vs_separate.png`` plots both
(:func:`compare_separate`).

Costs for a budget come from the run's ``submodels.json`` when it was profiled from the same
checkpoint and has the budgeted columns, else (parameters, MACs, FLOPs) from the callback's own
per-submodel table, else from profiling.
"""

from __future__ import annotations

import copy
import json
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from vlcompress.compress.slimmable import Slimmable, Submodel, parse_space
from vlcompress.compress.submodels import (
    latency_columns,
    latency_spread_problems,
    load_export,
    noisy_latency_message,
    parse_budget,
    profile_submodels,
    save_export,
    select,
)
from vlcompress.config import load_experiment
from vlcompress.utils.flops import interleaved_latency, resize_batch
from vlcompress.utils.io import atomic_write_json, atomic_write_text

__all__ = [
    "compare_separate",
    "export_from_run",
    "export_skipping_run",
    "is_skipping_run",
    "separate_runs",
]

log = logging.getLogger(__name__)

CALLBACK = "slimmable_training"
TABLE = "submodels.json"
_LATENCY = ("latency_b1_ms", "latency_large_ms")


def _fraction(text: str, what: str) -> float:
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{what}={text!r}: give a fraction such as 0.5 or 1/3.") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{what}={text!r}: must be in (0, 1], e.g. {what}=1/2.")
    return value


def _space(run: Path, raw: dict[str, Any]) -> list[Submodel]:
    """The run's slimmable_training space; a run without the callback is refused."""
    for cb in raw.get("callbacks") or []:
        if isinstance(cb, dict) and cb.get("name") == CALLBACK:
            return parse_space((cb.get("options") or {}).get("space", "triangle"))
    raise ValueError(
        f"{run} had no slimmable training (no {CALLBACK} callback in its config.yaml): only its "
        f"full model was trained, its submodels never were. Train with "
        f"callbacks=[{{name: {CALLBACK}}}] (e.g. make train EXP=seed001_bst_mcan_easy_vqa) and "
        "export that run."
    )


def _in_space(width: float, depth: float, space: list[Submodel]) -> Submodel:
    """The submodel of ``space`` at (``width``, ``depth``), within rounding."""
    for sub in space:
        if abs(sub.width - width) < 1e-3 and abs(sub.depth - depth) < 1e-3:
            return sub
    asked = Submodel(width, depth).name
    w, d = space[0].name[1:].split("-d")
    raise ValueError(
        f"{asked} is not in the run's submodel space (only those were trained): "
        f"{', '.join(s.name for s in space)}; give one of them, e.g. width={w} depth={d}."
    )


def _callback_tables(run: Path, checkpoint: dict[str, Any]) -> tuple[list, list, str]:
    """``(val rows, test rows, where the val rows came from)`` of the SlimmableTraining callback.

    The validation rows are those stored in the exported checkpoint (the validation epoch that
    made it the best) when present, else ``results.json``'s ``val_submodels``."""
    results: dict[str, Any] = {}
    path = run / "results.json"
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except ValueError:
            log.warning("%s is unreadable; the per-submodel accuracies are unknown", path)
    report = next(
        (v for k, v in (results.get("callbacks") or {}).items()
         if k.split("[")[0] == "SlimmableTraining" and isinstance(v, dict)),
        {},
    )  # fmt: skip
    test = report.get("test_submodels") or []
    state = next(
        (v for k, v in (checkpoint.get("callbacks") or {}).items()
         if str(k).split("[")[0] == "SlimmableTraining" and isinstance(v, dict)),
        {},
    )  # fmt: skip
    val = ((state.get("state") or {}).get("tables") or {}).get("val") or []
    if val:
        return val, test, "checkpoint"
    return report.get("val_submodels") or [], test, "results.json"


def _checkpoint_id(ckpt: Path) -> dict[str, Any]:
    st = ckpt.stat()
    return {"checkpoint": str(ckpt.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _reusable_rows(
    run: Path, source: dict[str, Any], space: list[Submodel], keys: list[str], large_batch: int
) -> list[dict[str, Any]] | None:
    """The rows of the run's ``submodels.json`` when they were profiled from the same
    checkpoint for the same space and hold every column of ``keys``."""
    path = run / TABLE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError:
        return None
    rows = saved.get("rows") or []
    why = None
    if saved.get("source") != source:
        why = "it was profiled from another checkpoint (or by an older version)"
    elif sorted(r.get("submodel") for r in rows) != sorted(s.name for s in space):
        why = "its submodels are not the run's space"
    elif any(r.get(k) is None for r in rows for k in keys):
        why = f"it lacks some of {keys}"
    elif "latency_large_ms" in keys and saved.get("batch_large") != large_batch:
        why = f"its large-batch latency is at batch {saved.get('batch_large')}, not {large_batch}"
    if why:
        log.info("not reusing %s: %s; profiling the submodels", path, why)
        return None
    log.debug("costs from %s (profiled from the same checkpoint)", path)
    return [dict(r) for r in rows]


def _with_accuracy(rows: list[dict], val: list[dict], test: list[dict]) -> list[dict[str, Any]]:
    v = {r["submodel"]: r.get("accuracy") for r in val}
    t = {r["submodel"]: r.get("accuracy") for r in test}
    out = []
    for r in rows:
        r = {k: x for k, x in r.items() if k not in ("accuracy", "examples")}
        out.append({**r, "val_accuracy": v.get(r["submodel"]),
                    "test_accuracy": t.get(r["submodel"])})  # fmt: skip
    return out


def _choose(rows: list[dict[str, Any]], bounds: dict[str, float], budget: str) -> dict[str, Any]:
    """The row with the best validation accuracy within ``bounds``."""
    candidates = [r for r in rows if r.get("val_accuracy") is not None]
    unscored = [r["submodel"] for r in rows if r.get("val_accuracy") is None]
    if unscored:
        log.warning("submodels without a validation accuracy are not candidates: %s", unscored)
    problems = latency_spread_problems(candidates, keys=[k for k in bounds if k in _LATENCY])
    if problems:
        log.warning("budget %s: %s", budget, noisy_latency_message(problems))
    best = select(candidates, bounds, metric="val_accuracy")
    test = best.get("test_accuracy")
    log.info(
        "budget %s: %s, selected by validation accuracy %.4f (test accuracy %s, for "
        "information only)", budget, best["submodel"], best["val_accuracy"],
        "unknown" if test is None else f"{test:.4f}",
    )  # fmt: skip
    return best


def _num(v: float | None, scale: float = 1.0) -> str:
    if v is None:
        return ""
    v = v / scale
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _ms(r: dict[str, Any], key: str) -> str:
    med, p10, p90 = (r.get(f"{key}{s}") for s in ("_ms", "_p10_ms", "_p90_ms"))
    if med is None:
        return ""
    return _num(med) + ("" if p10 is None else f" ({_num(p10)}-{_num(p90)})")


def table_cells(rows: list[dict[str, Any]], large: int) -> tuple[list[str], list[list[str]]]:
    """Column names and cells of the submodel table (``--table``, ``submodels.md``).

    Args:
        rows: joined rows (costs, ``val_accuracy``, ``test_accuracy``, latencies).
        large: the batch size of the second latency.

    Returns:
        ``(header, rows of strings)``; a latency cell is ``median (p10-p90)`` in ms.
    """
    header = ["submodel", "val acc", "test acc", "params (M)", "MACs (M)", "b1 ms",
              f"b{large} ms"]  # fmt: skip

    def acc(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    cells = [
        [r["submodel"], acc(r.get("val_accuracy")), acc(r.get("test_accuracy")),
         _num(r.get("parameters"), 1e6), _num(r.get("macs"), 1e6), _ms(r, "latency_b1"),
         _ms(r, "latency_large")]
        for r in rows
    ]  # fmt: skip
    return header, cells


TABLE_NOTE = (
    "val acc selects budget= exports; test acc is for information only; latency: median "
    "(p10-p90) of repeated calls"
)
"""The legend of the submodel table."""


def _markdown(rows: list[dict[str, Any]], large: int) -> str:
    header, cells = table_cells(rows, large)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines) + f"\n\n{TABLE_NOTE}.\n"


def _inputs(dm: Any, batch: Any) -> tuple[dict[str, Any], Any]:
    """What an export needs to answer questions (``inputs.json``) and the tokenizer, if any."""
    info = dm.info()
    inputs = {
        "answers": list(info.answers),
        "text_encoding": info.text_encoding,
        "max_question_len": int(dm.options.max_question_len),
        "visual_input": info.visual_input,
        "visual_shape": list(batch.visual.shape[1:]),
    }
    tokenizer = None
    if info.text_encoding == "words":
        inputs["words"] = list(dm.word_vocab.words)
    else:
        tokenizer = dm.tokenizer
    return inputs, tokenizer


def export_from_run(
    run: str | Path,
    *,
    width: str | None = None,
    depth: str | None = None,
    budget: str | None = None,
    table: bool = False,
    latency: bool = True,
    large_batch: int = 64,
    repeats: int = 20,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Profile and / or export submodels of the slimmable run in ``run`` (see the module doc).

    Every argument is checked before any data or model is built. The weights are the run's
    best checkpoint (chosen by the full model's validation accuracy).

    Args:
        run: the run folder (trained with the ``slimmable_training`` callback).
        width, depth: the submodel to export (fractions such as ``"1/2"``), one of the space.
        budget: instead, the submodel with the best validation accuracy within
            ``key=value[,key=value]`` (keys: :data:`~vlcompress.compress.submodels.BUDGET_KEYS`).
        table: profile every submodel into ``submodels.json`` / ``submodels.md``.
        latency: measure latency when profiling (a latency budget always does).
        large_batch: the batch size of the second latency.
        repeats: timed calls per latency (median and p10-p90 are reported).
        out: the export folder (default ``<run>/export/<submodel key>``).

    Returns:
        ``{"table": rows}`` (when profiled or read) and / or ``{"export": folder, "record": ...}``.

    Raises:
        FileNotFoundError: no such run folder or checkpoint.
        ValueError: a run without slimmable training, a width / depth outside its space, a bad
            budget, a budget without validation accuracies, or a budget nothing fits.
    """
    from vlcompress.run import build_datamodule, build_task
    from vlcompress.utils.init_from import resolve_init_path

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'} not found: give a vlcompress run folder.")
    if (width is None) != (depth is None):
        raise ValueError("give both width= and depth= (e.g. width=1/2 depth=1/3), or budget=.")
    if budget is not None and width is not None:
        raise ValueError("give either budget= or width= and depth=, not both.")
    _check_timing(large_batch, repeats)
    bounds = parse_budget(budget) if budget is not None else None
    asked = None
    if width is not None and depth is not None:
        asked = (_fraction(width, "width"), _fraction(depth, "depth"))
    cfg, raw_cfg = load_experiment(str(run / "config.yaml"))
    raw = OmegaConf.to_container(raw_cfg, resolve=True)
    space = _space(run, raw)
    chosen = _in_space(*asked, space) if asked else None
    ckpt = resolve_init_path(run, what="export", fix="give a finished run folder")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    val, test, val_source = _callback_tables(run, checkpoint)
    source = _checkpoint_id(ckpt)
    rows: list[dict[str, Any]] = []
    costs_from = None
    best: dict[str, Any] | None = None
    if bounds is not None:
        if not val:
            raise ValueError(
                f"budget= chooses by the per-submodel validation accuracy, which {run} does not "
                "record (no val_submodels in results.json: an older or unfinished run); give "
                "width= and depth= instead, or retrain it."
            )
        if not table:
            keys = list(bounds)
            saved = _reusable_rows(run, source, space, keys, large_batch)
            if saved is not None:
                rows, costs_from = saved, TABLE
            elif not any(k in bounds for k in _LATENCY) and all(
                r.get(k) is not None for r in val for k in keys
            ) and {r["submodel"] for r in val} == {s.name for s in space}:  # fmt: skip
                rows, costs_from = [dict(r) for r in val], "slimmable_training's table"
            if rows:
                rows = _with_accuracy(rows, val, test)
                best = _choose(rows, bounds, budget)

    dm = build_datamodule(cfg.data, cfg.seed)
    task = build_task(cfg, dm)
    state = checkpoint["state_dict"]
    model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    try:
        task.model.load_state_dict(model_state)  # strict: never export random weights
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(f"{ckpt} does not fit the model of {run / 'config.yaml'} ({first}); "
                         "was the configuration edited after training?") from None  # fmt: skip
    model = task.model.eval()
    batch = next(iter(dm.test_dataloader()))
    one, big = resize_batch(batch, 1), resize_batch(batch, large_batch)
    slim = Slimmable(model)
    result: dict[str, Any] = {}
    try:
        if table or (bounds is not None and best is None):
            lat = latency or (bounds is not None and any(k in bounds for k in _LATENCY))
            profiled = profile_submodels(slim, space, one, big if lat else None, latency=lat,
                                         repeats=repeats)  # fmt: skip
            rows, costs_from = _with_accuracy(profiled, val, test), "profiled"
            atomic_write_json(run / TABLE, {"source": source, "batch_large": large_batch,
                                            "repeats": repeats, "rows": rows})  # fmt: skip
            atomic_write_text(run / "submodels.md", _markdown(rows, large_batch))
            log.info("wrote %s and %s", run / TABLE, run / "submodels.md")
        if rows:
            result["table"] = rows
        if bounds is not None:
            best = best or _choose(rows, bounds, budget)
            chosen = Submodel(best["width"], best["depth"])
        if chosen is not None:
            result.update(_export(run, chosen, slim, model, dm, batch, one, cfg, raw, out,
                                  rows=rows, val=val, test=test, ckpt=ckpt, budget=budget,
                                  costs_from=costs_from, val_source=val_source))  # fmt: skip
    finally:
        slim.detach()
    return result


def _export(
    run: Path, chosen: Submodel, slim: Slimmable, model: torch.nn.Module, dm: Any, batch: Any,
    one: Any, cfg: Any, raw: dict[str, Any], out: str | Path | None, *, rows: list[dict],
    val: list[dict], test: list[dict], ckpt: Path, budget: str | None, costs_from: str | None,
    val_source: str,
) -> dict[str, Any]:  # fmt: skip
    """Write ``chosen`` as a standalone export and check the reloaded copy."""
    small = slim.export(chosen, one).eval()
    folder = Path(out) if out else run / "export" / chosen.key
    info = dm.info()
    acc = {r["submodel"]: r.get("accuracy") for r in val}
    tacc = {r["submodel"]: r.get("accuracy") for r in test}
    record = {
        "submodel": chosen.name,
        "width": chosen.width,
        "depth": chosen.depth,
        "source_run": str(run),
        "source_checkpoint": str(ckpt),
        "selected_by": f"validation accuracy within budget {budget}" if budget else "width/depth",
        "val_accuracy": acc.get(chosen.name),
        "val_accuracy_from": val_source,
        "test_accuracy": tacc.get(chosen.name),
        "parameters": sum(p.numel() for p in small.parameters()),
        **({"budget": budget, "costs_from": costs_from} if budget else {}),
        **({"row": next((r for r in rows if r["submodel"] == chosen.name), None)} if rows
           else {}),
    }  # fmt: skip
    inputs, tokenizer = _inputs(dm, batch)
    save_export(
        small,
        folder,
        model_name=cfg.model.name,
        context={"vocab_size": info.vocab_size, "num_answers": len(info.answers)},
        record=record,
        experiment=raw,
        inputs=inputs,
        tokenizer=tokenizer,
    )
    again = load_export(folder)
    with torch.no_grad(), slim.submodel(chosen):
        diff = float((again(batch) - model(batch)).abs().max())
    record["reload_max_abs_diff"] = diff
    _add_to_record(folder, {"reload_max_abs_diff": diff})
    if not diff <= 1e-4:
        raise ValueError(
            f"the reloaded export in {folder} differs from the slimmed model by {diff:.3g} "
            "(max |logit| difference); the export is wrong, please report it."
        )
    log.info("exported %s to %s", chosen.name, folder)
    return {"export": str(folder), "record": record}


def _finished_runs(folder: Path) -> list[Path]:
    """``folder`` when it holds a finished run (``results.json``), else its sub-folders that do
    (a sweep folder), searched two levels deep."""
    if (folder / "results.json").is_file():
        return [folder]
    return sorted(
        p.parent for p in [*folder.glob("*/results.json"), *folder.glob("*/*/results.json")]
    )


def separate_runs(folders: list[str | Path]) -> list[dict[str, Any]]:
    """The finished runs under ``folders`` as rows: ``run``, ``seed``, ``parameters``,
    ``macs`` (half the run's FLOPs per example), ``accuracy`` and ``balanced_accuracy`` on test,
    and the question types it answers blind (``blind_question_types``).

    Raises:
        FileNotFoundError: a folder does not exist or holds no finished run.
    """
    rows = []
    for folder in map(Path, folders):
        runs = _finished_runs(folder) if folder.is_dir() else []
        if not runs:
            raise FileNotFoundError(
                f"--separate {folder}: no finished run (no results.json) there or one or two "
                "levels below; give run folders or a sweep folder of separately trained models"
            )
        for run in runs:
            r = json.loads((run / "results.json").read_text())
            test, blind = r.get("test") or {}, r.get("blind") or {}
            rows.append({
                "run": str(run),
                "seed": _seed_of(run),
                "parameters": (r.get("parameters") or {}).get("total"),
                "macs": (r.get("flops_per_sample") or 0) / 2,
                "accuracy": test.get("accuracy"),
                "balanced_accuracy": test.get("balanced_accuracy"),
                "blind_question_types": blind.get("blind_question_types") or [],
            })  # fmt: skip
    return rows


def _seed_of(run: Path) -> int | None:
    try:
        return int((OmegaConf.load(run / "config.yaml") or {}).get("seed"))
    except (OSError, TypeError, ValueError):
        return None


def compare_separate(run: str | Path, folders: list[str | Path]) -> dict[str, Any]:
    """Match separately trained runs to the submodels of slimmable run ``run`` (same parameter
    count and MACs) and plot both against MACs in ``<run>/slimmable_vs_separate.png``.

    Returns:
        ``{"submodels": the run's test rows, "separate": separate_runs(...) rows with the
        ``submodel`` each matches (``None``: no submodel of that shape; the run itself is left
        out), "plot": the PNG's path, ``None`` when the rows have no costs to plot}``.

    Raises:
        FileNotFoundError: ``run`` has no finished slimmable results, or a folder holds no run.
    """
    run = Path(run)
    try:
        results = json.loads((run / "results.json").read_text())
        rows = results["callbacks"]["SlimmableTraining"]["test_submodels"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(
            f"{run}: no finished slimmable_training run (results.json without the callback's "
            "test_submodels); train it to the end first"
        ) from e
    shape = {(r.get("parameters"), round(r.get("macs") or 0)): r["submodel"] for r in rows}
    separate = [s for s in separate_runs(folders) if Path(s["run"]).resolve() != run.resolve()]
    for s in separate:
        s["submodel"] = shape.get((s["parameters"], round(s["macs"] or 0)))
    from vlcompress.utils.plots import plot_submodels

    data = results.get("data") or {}
    reference = {}
    if data.get("prior_baseline") is not None:
        reference["blind: the commonest answer per question type"] = data["prior_baseline"]
    path = run / "slimmable_vs_separate.png"
    drawn = plot_submodels(rows, path, separate=separate, reference=reference)
    return {"submodels": rows, "separate": separate, "plot": str(path) if drawn else None}


# ---------------------------------------------------------------------- skipping runs
SKIPPING = "architecture_skipping"


def is_skipping_run(run: str | Path) -> bool:
    """Whether the run folder trained with the ``architecture_skipping`` callback."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        return False
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return any(c.get("name") == SKIPPING for c in raw.get("callbacks") or [] if isinstance(c, dict))


def export_skipping_run(
    run: str | Path,
    out: str | Path | None = None,
    latency: bool = True,
    large_batch: int = 64,
    repeats: int = 20,
) -> dict[str, Any]:
    """Export the adapted model of an ``architecture_skipping`` run as a standalone model: its
    best checkpoint's weights, the parallel adapters installed as a submodule and the chosen
    layers *removed*, each replaced by its skip adapter
    (:func:`~vlcompress.compress.adapters.install_adapters`). The reloaded export is checked
    against the callback's model on one validation batch.

    Args:
        run: the run folder.
        out: the export folder (default ``<run>/export/skipped``).
        latency: also time the reloaded export against the full model (the backbone with the
            run's weights, no adapters, nothing skipped) in fp32 on this machine's CPU, at batch
            1 and ``large_batch``, calls interleaved in one run (median and p10-p90, ms; their
            ratio). A timing that fails is logged and left out; the export stays.
        large_batch: the second batch size.
        repeats: timed calls of each model per batch size.

    Returns:
        ``{"export": folder, "record": ...}``; the record's ``latency`` (when measured) is also
        in ``export.json``.

    Raises:
        FileNotFoundError: no run folder or checkpoint.
        ValueError: a run that did not finish its search (no skipped layers yet), or
            ``large_batch`` / ``repeats`` below 1.
    """
    _check_timing(large_batch, repeats)
    from vlcompress.callbacks import ArchitectureSkipping
    from vlcompress.compress.adapters import install_adapters
    from vlcompress.models.anatomy import anatomy_of
    from vlcompress.run import build_datamodule, build_task
    from vlcompress.utils.init_from import resolve_init_path

    run = Path(run)
    cfg, raw_cfg = load_experiment(str(run / "config.yaml"))
    raw = OmegaConf.to_container(raw_cfg, resolve=True)
    options = next(c.options for c in cfg.callbacks if c.name == SKIPPING)
    ckpt = resolve_init_path(run, what="export", fix="give a finished run folder")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    entry = next((v for k, v in checkpoint.get("callbacks", {}).items()
                  if k.startswith("ArchitectureSkipping")), None)  # fmt: skip
    state = (entry or {}).get("state", {})
    adapters_only = state.get("skip", 1) == 0  # skip: 0 exports its parallel adapters alone
    if state.get("phase") != "skipping" or not (state.get("chosen") or adapters_only):
        raise ValueError(
            f"{ckpt} is from the search phase of {run} (no layer skipped yet): train the run "
            "past its search_epochs, then export it."
        )
    dm = build_datamodule(cfg.data, cfg.seed)
    task = build_task(cfg, dm)
    task.load_state_dict(checkpoint["state_dict"])
    model = task.model.eval()
    batch = next(iter(dm.val_dataloader()))
    # the callback's model, as trained: hooked adapters, chosen layers skipped in place
    cb = ArchitectureSkipping(**dict(options))
    cb.setup(_Shim(model), task, "validate")
    cb.load_state_dict(entry)
    with torch.no_grad():
        want = model(batch)
    cb.teardown(_Shim(model), task, "validate")
    full = copy.deepcopy(model).eval() if latency else None
    spec = {"bottleneck": int(cb.bottleneck),
            "skipped": {name: int(cb.skip_bottleneck) for name in state["chosen"]}}  # fmt: skip
    weights = {k: v for k, v in entry["owned"]["modules"].items()}
    small = install_adapters(model, anatomy_of(model), spec, weights).eval()
    folder = Path(out) if out else run / "export" / "skipped"
    info = dm.info()
    record = {
        "skipped": list(state["chosen"]),
        "source_run": str(run),
        "source_checkpoint": str(ckpt),
        "parameters": sum(p.numel() for p in small.parameters()),
    }
    inputs, tokenizer = _inputs(dm, batch)
    save_export(
        small, folder, model_name=cfg.model.name,
        context={"vocab_size": info.vocab_size, "num_answers": len(info.answers)},
        record=record, experiment=raw, inputs=inputs, tokenizer=tokenizer, adapters=spec,
    )  # fmt: skip
    again = load_export(folder)
    with torch.no_grad():
        diff = float((again(batch) - want).abs().max())
    record["reload_max_abs_diff"] = diff
    _add_to_record(folder, {"reload_max_abs_diff": diff})
    if diff > 1e-4:  # keep it for inspection, under a name nobody loads by mistake
        failed = folder.with_name(f"{folder.name}.failed")
        folder.rename(failed)
        raise ValueError(f"the reloaded export differs from the run's model by {diff:.2e}; "
                         f"it is kept in {failed} for inspection")  # fmt: skip
    if full is not None:
        try:
            record["latency"] = _paired_latency(full, again, batch, large_batch, repeats)
        except (RuntimeError, MemoryError) as e:  # the export is done; the timing is extra
            log.warning("export %s: the latency could not be measured: %s", folder, e)
        else:
            _add_to_record(folder, {"latency": record["latency"]})
    return {"export": folder, "record": record}


def _check_timing(large_batch: int, repeats: int) -> None:
    """Refuse latency settings below 1 (before any work)."""
    if large_batch < 1 or repeats < 1:
        raise ValueError(f"--large-batch and --repeats must be at least 1, got {large_batch} "
                         f"and {repeats}.")  # fmt: skip


def _add_to_record(folder: Path, extra: dict[str, Any]) -> None:
    """Merge ``extra`` into the export's ``export.json`` (atomically; the digest and the
    record written with the model stay)."""
    atomic_write_json(folder / "export.json",
                      {**json.loads((folder / "export.json").read_text()), **extra})  # fmt: skip


def _paired_latency(
    full: torch.nn.Module, small: torch.nn.Module, batch: Any, large: int, repeats: int
) -> dict[str, dict[str, float]]:
    """CPU latency (fp32) of the full and the exported model, interleaved, at batch 1 and
    ``large``; a wide p10-p90 spread (a noisy machine) is warned about."""
    out: dict[str, dict[str, Any]] = {}
    for size in sorted({1, large}):
        b = resize_batch(batch, size)
        with torch.inference_mode():
            times = interleaved_latency({"full": lambda b=b: full(b),
                                         "exported": lambda b=b: small(b)}, repeats)  # fmt: skip
        row: dict[str, Any] = {}
        for k, v in times.items():
            row.update(latency_columns(k, v))
        row["ratio"] = round(row["exported_ms"] / row["full_ms"], 4)
        row["threads"] = torch.get_num_threads()
        out[f"batch_{size}"] = row
    named = [{"submodel": k.replace("_", " "), **v} for k, v in out.items()]
    problems = latency_spread_problems(named, keys=("full_ms", "exported_ms"))
    if problems:
        log.warning("export latency: %s", noisy_latency_message(problems))
    return out


class _Shim:
    """The little of a Trainer that a callback's ``setup`` reads outside a fit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.global_step = 0
        self.world_size = 1
        self.global_rank = 0
        self.strategy = None
