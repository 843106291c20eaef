"""Command line: ``python -m vlcompress {train,validate,list} [EXP] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from rich.console import Console
from rich.table import Table

from vlcompress.config import ConfigError, list_experiments, load_experiment
from vlcompress.registry import KINDS, components


def results_table(results: dict[str, Any]) -> Table:
    """A rich table of a run's results."""
    table = Table(title=f"results: {results.get('experiment')} ({results.get('model')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    test = results.get("test", {})
    table.add_row("test accuracy (VQA)", f"{test.get('accuracy', float('nan')):.4f}")
    for kind in ("answer_type", "question_type"):
        for k, v in sorted(test.get(kind, {}).items()):
            table.add_row(f"  {kind.replace('_', ' ')}: {k}", f"{v:.4f}")
    if results.get("best_val_accuracy") is not None:
        table.add_row("best val accuracy", f"{results['best_val_accuracy']:.4f}")
    data = results.get("data", {})
    if data.get("mean_tv_distance") is not None:
        table.add_row(
            f"data: {data.get('name')} / {data.get('split')}",
            f"{data.get('train')}/{data.get('val')}/{data.get('test')} "
            f"(train-test TV {data['mean_tv_distance']:.2f})",
        )
    for metric, value in results.get("callback_rows", []):
        table.add_row(metric, value)
    p = results.get("parameters", {})
    table.add_row("parameters", f"{p.get('total', 0):,}")
    table.add_row("FLOPs / sample", f"{results.get('flops_per_sample', 0) / 1e6:,.1f} M")
    table.add_row("train wall time", f"{results.get('train_wall_time_s', 0):.1f} s")
    table.add_row("epochs / steps", f"{results.get('epochs')} / {results.get('global_steps')}")
    table.add_row("run folder", str(results.get("output_dir")))
    return table


def components_table(kinds: list[str] | dict[str, str]) -> Table:
    """A rich table of the registered components of ``kinds``: name, options, summary."""
    import dataclasses

    table = Table(title="registered components")
    for col in ("kind", "name", "options", "summary"):
        table.add_column(col)
    for kind in kinds:
        for name, comp in sorted(components(kind).items()):
            opts = ", ".join(f.name for f in dataclasses.fields(comp.options)) or "-"
            table.add_row(kind, name, opts, comp.summary)
    return table


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for configuration errors)."""
    parser = argparse.ArgumentParser(prog="vlcompress", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("train", "train and test an experiment"),
        ("validate", "only validate an experiment's configuration"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument(
            "exp",
            nargs="?",
            default="default",
            help="experiment name under experiments/ or a YAML path",
        )
        p.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=3"
        )
    lst = sub.add_parser("list", help="list the experiments, or the registered components")
    lst.add_argument(
        "what",
        nargs="?",
        default="experiments",
        choices=["experiments", "components", *KINDS],
        help="experiments (default), components (all kinds), or one kind",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").propagate = False  # it has its own console handler
    console = Console()

    if args.command == "list":
        if args.what == "experiments":
            for name in list_experiments():
                print(name)
            return 0
        console.print(components_table(KINDS if args.what == "components" else [args.what]))
        return 0
    try:
        cfg, raw = load_experiment(args.exp, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "validate":
        print(f"experiment {args.exp!r} is valid")
        return 0

    from vlcompress.callbacks import NonFiniteLossError
    from vlcompress.run import run_experiment

    try:
        results = run_experiment(cfg, raw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if results:
        console.print(results_table(results))
    return 0
