"""Command line: ``python -m vlcompress {train,validate,list,sweep,report,prepare,export} ...``.

train: train and test an experiment; validate: check it without running; list: experiments or
components; sweep / report: a hyper-parameter sweep and its table; prepare: convert features
once; export: submodels of a slimmable run."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from vlcompress.config import ConfigError, list_experiments, load_experiment
from vlcompress.registry import KINDS, components

CLIP_GRID = "clip-grid"
"""``prepare clip-grid``: CLIP grid features of images instead of a benchmark's TSV files."""


def results_table(results: dict[str, Any]) -> Table:
    """A rich table of a run's results (with the blind-model check: does it read the image?)."""
    from vlcompress.metrics.blind import blind_text

    table = Table(title=f"results: {results.get('experiment')} ({results.get('model')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    test = results.get("test", {})
    table.add_row("test accuracy (VQA)", f"{test.get('accuracy', float('nan')):.4f}")
    if test.get("balanced_accuracy") is not None:
        table.add_row("test balanced accuracy", f"{test['balanced_accuracy']:.4f}")
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
    if data.get("anti_prior_baseline") is not None:
        table.add_row(
            "blind baselines (whole test split): prior / anti-prior",
            f"{data['prior_baseline']:.4f} / {data['anti_prior_baseline']:.4f}",
        )
    blind = results.get("blind")
    if blind:
        text = blind_text(blind)
        style = "red" if blind["answers_without_image"] else "green"
        table.add_row(f"[{style}]reads the image?[/{style}]", f"[{style}]{text}[/{style}]")
    for metric, value in results.get("callback_rows", []):
        table.add_row(metric, value)
    p = results.get("parameters", {})
    table.add_row("parameters", f"{p.get('total', 0):,}")
    table.add_row("FLOPs / sample", f"{results.get('flops_per_sample', 0) / 1e6:,.1f} M")
    table.add_row("train wall time (all launches)", f"{results.get('train_wall_time_s', 0):.1f} s")
    training = results.get("training") or {}
    planned = training.get("steps_planned")
    steps = f"{results.get('global_steps')}" + (f" of {planned}" if planned else "")
    table.add_row("epochs / steps", f"{results.get('epochs')} / {steps}")
    if training.get("stopped_by") not in (None, "completed"):
        table.add_row("[yellow]training stopped early[/yellow]", training.get("message", ""))
    table.add_row("run folder", str(results.get("output_dir")))
    return table


def _plain(text: str) -> str:
    """Docstring markup as plain text: ``x`` and :class:`~a.B` become x and B."""
    text = re.sub(r":\w+:`~?(?:[\w.]+\.)?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def _option_lines(comp: Any) -> str:
    """``name: type = default`` per option of a component (its own defaults for variants)."""
    from vlcompress.config.validate import _type_name

    hints = typing.get_type_hints(comp.options)
    lines = []
    for f in dataclasses.fields(comp.options):
        if comp.defaults is not None:
            default: Any = getattr(comp.defaults, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"{f.name}: {_type_name(hints[f.name])} = {default!r}")
    return "\n".join(lines) or "-"


def components_table(kinds: list[str] | dict[str, str]) -> Table:
    """A rich table of the registered components of ``kinds``: name, options (type and
    default), summary (first sentence of the docstring)."""
    table = Table(title="registered components", show_lines=True)
    for col in ("kind", "name", "options (type = default)", "summary"):
        table.add_column(col)
    for kind in kinds:
        for name, comp in sorted(components(kind).items()):
            table.add_row(kind, name, _option_lines(comp), _plain(comp.summary))
    return table


def _cluster_command(args: argparse.Namespace, console: Console) -> int:
    """``sweep`` (exit 1 when a point failed, 2 for configuration errors) and ``report``."""
    if args.command == "report":
        from vlcompress.cluster.report import build_report, report_table, write_report

        try:
            report = build_report(args.folder, args.metric)
            base = build_report(args.baseline, report.metric) if args.baseline else None
            written = write_report(report, args.x, base)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        console.print(report_table(report))
        for problem in report.problems:
            console.print(f"[yellow]no result:[/yellow] {problem}", highlight=False)
        for path in [written["csv"], written["md"], *written["png"]]:
            print(f"wrote {path}")
        return 0

    from vlcompress.cluster.sweep import submit_sweep, summarize

    try:
        manifest = submit_sweep(args.exp, args.overrides, wait=not args.no_wait)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = Table(title=f"sweep {manifest['experiment']}: {manifest['sweep_dir']}")
    for col in ("point", "outcome", "job", "error"):
        table.add_column(col)
    for p in manifest["points"]:
        error = (p.get("error") or "").splitlines()[0:1]
        table.add_row(p["name"], str(p["outcome"]), p.get("job_id") or "-", "".join(error)[:160])
    console.print(table)
    counts = summarize(manifest)
    print("sweep: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    print(f"report: make report SWEEP={manifest['sweep_dir']}")
    return 1 if counts["failed"] else 0


def _prepare_command(args: argparse.Namespace) -> int:
    """``prepare``: convert a benchmark's region features once, or compute CLIP grid features
    of images (``prepare clip-grid``) (exit 1 for bad inputs, 2 for a benchmark with nothing to
    prepare, 130 when interrupted: rerun to continue)."""
    from vlcompress.registry import UnknownComponentError, get

    if args.benchmark == CLIP_GRID:
        from vlcompress.data.clip_grid import convert_clip_grid

        return _convert("CLIP grid store", lambda: convert_clip_grid(
            args.images, args.out, encoder=args.encoder, checkpoint=args.checkpoint,
            image_size=args.image_size, dtype=args.dtype, batch_size=args.batch_size,
            device=args.device, workers=args.workers,
        ))  # fmt: skip
    try:
        builder = get("datamodule", args.benchmark).builder
    except UnknownComponentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prepare = getattr(builder, "prepare_regions", None)
    if prepare is None:
        print(
            f"error: data module {args.benchmark!r} has no region features to prepare",
            file=sys.stderr,
        )
        return 2
    max_boxes = 36 if args.max_boxes is None else args.max_boxes
    return _convert(
        "region store", lambda: prepare(args.tsv, args.out, dtype=args.dtype, max_boxes=max_boxes)
    )


def _convert(what: str, run: Any) -> int:
    """Run a store conversion with ``prepare``'s exit codes: 0 done, 1 bad input, 130
    interrupted (rerun to continue)."""
    try:
        out = run()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped: rerun the same command to continue the conversion", file=sys.stderr)
        return 130
    print(f"{what} ready: {out} (data.options.regions_dir)")
    return 0


def backbones_table() -> Table:
    """Every backbone recipe: its state, accuracy and balanced accuracy next to both blind
    baselines (a constant answer per question type: its accuracy, its balanced accuracy)."""
    from vlcompress.backbones import backbone_names, backbone_status

    table = Table(title="pretrained backbones (experiments/backbones/)")
    table.add_column("backbone", overflow="fold")
    for col in ("state", "accuracy", "balanced", "blind acc / bal", "sees", "min"):
        table.add_column(col)
    fmt = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for name in backbone_names():
        st = backbone_status(name)
        r = st.row()
        sees = {None: "-", True: "BLIND", False: "yes"}[r["answers_without_image"]]
        if sees == "yes" and r["blind_question_types"]:
            sees = f"BLIND on {len(r['blind_question_types'])} types"
        state = st.state + (" (resumable)" if st.state == "unfinished" and st.resumable else "")
        blind = f"{fmt(r['prior_baseline'])} / {fmt(r['blind_balanced_baseline'])}"
        table.add_row(
            name, state, fmt(r["accuracy"]), fmt(r["balanced_accuracy"]), blind, sees,
            fmt(r["train_minutes"], 0),
        )  # fmt: skip
    return table


def _backbones_command(args: argparse.Namespace, console: Console) -> int:
    from vlcompress.backbones import build_backbones

    overrides = [n for n in args.names if "=" in n]
    names = [n for n in args.names if "=" not in n]
    if not args.list:
        try:
            done = build_backbones(names, overrides, dry_run=args.dry_run)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for name, what in done:
            console.print(f"{name}: {what}")
        if any(what.startswith("failed") for _, what in done):
            console.print(backbones_table())
            return 1
    console.print(backbones_table())
    return 0


def _separate_table(cmp: dict[str, Any], console: Console) -> None:
    """Print each separately trained run beside the slimmable run's submodel of its shape."""
    by_name = {r["submodel"]: r for r in cmp["submodels"]}
    table = Table(
        title="submodels vs. the same shapes trained on their own",
        caption=f"plot: {cmp['plot'] or 'none (no MACs)'}; blind = question types answered "
        "without the image",
    )
    for col in ("run", "seed", "shape", "MACs (M)", "own: test acc", "balanced", "blind",
                "submodel: test acc"):  # fmt: skip
        table.add_column(col, justify="left" if col == "run" else "right")

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    for s in cmp["separate"]:
        sub = by_name.get(s["submodel"])
        table.add_row(
            Path(s["run"]).name, str(s["seed"]), s["submodel"] or "no submodel",
            f"{s['macs'] / 1e6:.1f}", fmt(s["accuracy"]), fmt(s["balanced_accuracy"]),
            str(len(s["blind_question_types"])), fmt(sub["accuracy"] if sub else None),
        )  # fmt: skip
    (console if console.is_terminal else Console(width=140)).print(table)


def _export_command(args: argparse.Namespace, console: Console) -> int:
    """``export``: profile a slimmable run's submodels and / or export one (exit 1 for bad
    inputs, with one ``error:`` line)."""
    import difflib

    from vlcompress.export import TABLE_NOTE, export_from_run, table_cells

    def fail(message: object) -> int:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1

    settings: dict[str, str] = {}
    for item in args.settings:
        key, sep, value = item.partition("=")
        if not sep or key not in ("width", "depth", "budget"):
            close = difflib.get_close_matches(key, ("width", "depth", "budget"), n=1)
            hint = f" (did you mean {close[0]}=?)" if close and sep else ""
            return fail(f"{item!r}{hint}: use width=... depth=... (e.g. width=1/2 depth=1/3) "
                        "or budget=key=value (e.g. budget=macs=1e7)")  # fmt: skip
        if key in settings:
            return fail(f"{key}= is given twice; give it once")
        settings[key] = value
    from vlcompress.export import export_skipping_run, is_skipping_run

    if is_skipping_run(args.run):  # seed 002: the adapted model with its layers removed
        if settings or args.table or args.separate:
            return fail("a skipping run exports its one adapted model: give no width=, "
                        "depth=, budget=, --table or --separate")  # fmt: skip
        try:
            result = export_skipping_run(args.run, out=args.out, latency=not args.no_latency,
                                         large_batch=args.large_batch, repeats=args.repeats)  # fmt: skip
        except (FileNotFoundError, ValueError, ConfigError) as e:
            return fail(e)
        rec = result["record"]
        print(f"exported the model with {', '.join(rec['skipped'])} skipped "
              f"({rec['parameters']:,} parameters) to {result['export']} (reloaded: max |diff| "
              f"{rec['reload_max_abs_diff']:.2e}); answer questions with "
              f"ExportedModel.load({str(result['export'])!r}).predict(questions, images)")  # fmt: skip
        for key, row in rec.get("latency", {}).items():
            print(f"CPU latency at {key.replace('_', ' ')} (fp32, {row['threads']} threads): full "
                  f"{row['full_ms']:.2f} ms, exported {row['exported_ms']:.2f} ms "
                  f"(ratio {row['ratio']:.3f})")  # fmt: skip
        return 0
    if not settings and not args.table and not args.separate:
        return fail("nothing to do: give width= and depth=, budget=..., --table or --separate")
    if args.separate:
        from vlcompress.export import compare_separate

        try:
            cmp = compare_separate(args.run, args.separate)
        except (FileNotFoundError, ValueError) as e:
            return fail(e)
        _separate_table(cmp, console)
        if not settings and not args.table:
            return 0
    try:
        result = export_from_run(
            args.run, table=args.table, latency=not args.no_latency,
            large_batch=args.large_batch, repeats=args.repeats, out=args.out, **settings,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ConfigError) as e:
        return fail(e)
    rows = result.get("table")
    if rows and args.table:
        header, cells = table_cells(rows, args.large_batch)
        table = Table(title=f"submodels of {args.run}", caption=TABLE_NOTE)
        for col in header:
            table.add_column(col, justify="right", no_wrap=True)
        for row in cells:
            table.add_row(*row)
        (console if console.is_terminal else Console(width=120)).print(table)
    if "export" in result:
        rec = result["record"]
        if rec.get("budget"):
            val, test = rec.get("val_accuracy"), rec.get("test_accuracy")
            tested = "" if test is None else f"; test accuracy {test:.4f}, not used to select"
            print(f"budget {rec['budget']}: {rec['submodel']} has the best validation accuracy "
                  f"({val:.4f}) of the submodels within it{tested}")  # fmt: skip
        print(f"exported {rec['submodel']} ({rec['parameters']:,} parameters) to {result['export']}"
              f" (reloaded: max |diff| {rec['reload_max_abs_diff']:.2e}); answer questions with "
              f"ExportedModel.load({str(result['export'])!r}).predict(questions, images)")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for configuration errors)."""
    parser = argparse.ArgumentParser(
        prog="vlcompress",
        description="Compress and debias vision-language models: train experiments, sweep, "
        "report, prepare features, export submodels. `vlcompress <command> --help` for one.",
        epilog="examples: vlcompress train default trainer.max_epochs=3 | vlcompress validate "
        "seed001_bst_mcan_easy_vqa | vlcompress export runs/<run> --table",
    )
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
    sw = sub.add_parser(
        "sweep", help="run an experiment's sweep: section (Slurm job array, or locally)"
    )
    sw.add_argument("exp", help="experiment name under experiments/ or a YAML path")
    sw.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides for every point; output_dir=<sweep folder>",
    )
    sw.add_argument("--no-wait", action="store_true", help="Slurm: submit the job array and return")
    rep = sub.add_parser("report", help="aggregate a sweep folder: table (CSV, Markdown), plots")
    rep.add_argument("folder", help="the sweep folder (holding sweep.json)")
    rep.add_argument("--metric", default=None, help="results.json value (default: sweep.metric)")
    rep.add_argument("--x", default=None, help="plot against this swept key only")
    rep.add_argument(
        "--baseline",
        default=None,
        help="another sweep folder (e.g. the dense models) drawn as dashed lines",
    )
    prep = sub.add_parser(
        "prepare",
        help="convert region features once (LXMERT obj36 TSV -> memory-mapped arrays), or "
        "compute CLIP grid features of images (prepare clip-grid)",
    )
    prep.add_argument(
        "benchmark",
        help=f"data module, e.g. vqa_v2 or vqa_cp_v2 (with --tsv); or {CLIP_GRID} (with "
        "--images): CLIP grid features of COCO images for CLIP-ViL",
    )
    prep.add_argument("--tsv", nargs="+", help="obj36 TSV files (all the images)")
    prep.add_argument(
        "--out",
        required=True,
        help="store folder (data.options.regions_dir, default <data_dir>/regions_obj36)",
    )
    prep.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    prep.add_argument(
        "--max-boxes", type=int, default=None, help="regions kept per image (default 36)"
    )
    grid = prep.add_argument_group(f"{CLIP_GRID} (CLIP-ViL)")
    grid.add_argument("--images", nargs="+", help="image folders (e.g. COCO train2014 val2014)")
    grid.add_argument("--encoder", default="resnet50_clip", help="CLIP ResNet (timm name)")
    grid.add_argument(
        "--checkpoint", default=None, help="OpenAI's checkpoint (RN50.pt); omitted: random weights"
    )
    grid.add_argument("--image-size", type=int, default=448, help="square input size (pixels)")
    grid.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    grid.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    grid.add_argument("--workers", type=int, default=None, help="image reading threads")
    bb = sub.add_parser(
        "backbones",
        help="train the pretrained backbones of experiments/backbones/ not finished yet "
        "(init_from=backbone:<name> starts from one); --list shows them",
    )
    bb.add_argument(
        "names",
        nargs="*",
        help="backbones to build (default: all), and key=value overrides for every run",
    )
    bb.add_argument("--list", action="store_true", help="only show each backbone's state")
    bb.add_argument("--dry-run", action="store_true", help="only say what would run")
    exp = sub.add_parser(
        "export",
        help="submodels of a slimmable run: cost table (--table) and / or an export; "
        "the adapted model of a skipping run",
    )
    exp.add_argument("run", help="the run folder (trained with slimmable_training)")
    exp.add_argument(
        "settings",
        nargs="*",
        help="width=1/2 depth=1/3 (a submodel of the run's space), or budget=macs=1e7 (the best "
        "validation accuracy within; keys: parameters, macs, flops, latency_b1_ms, "
        "latency_large_ms)",
    )
    exp.add_argument("--table", action="store_true", help="profile every submodel of the space")
    exp.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    exp.add_argument("--large-batch", type=int, default=64, help="batch of the second latency")
    exp.add_argument(
        "--repeats", type=int, default=20, help="timed calls per latency (median, p10-p90)"
    )
    exp.add_argument("--out", default=None, help="export folder (default <run>/export/<key>)")
    exp.add_argument(
        "--separate",
        nargs="+",
        metavar="FOLDER",
        help="compare with models of the same shapes trained on their own (run folders or a "
        "sweep folder): a table and <run>/slimmable_vs_separate.png",
    )
    args, extra = parser.parse_known_args(argv)
    settings = [e for e in extra if "=" in e and not e.startswith("-")]
    if settings and args.command == "export":  # key=value settings after an option
        args.settings += settings
        extra = [e for e in extra if e not in settings]
    if args.command == "export" and args.separate:  # --separate DIR width=1/2: not a folder
        args.settings += [e for e in args.separate if "=" in e]
        args.separate = [e for e in args.separate if "=" not in e]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").propagate = False  # it has its own console handler
    # Lightning's own use of torch's deprecated pytree LeafSpec; nothing a user can change
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
    console = Console()

    if args.command in ("sweep", "report"):
        return _cluster_command(args, console)
    if args.command == "prepare":
        if args.benchmark == CLIP_GRID:
            if not args.images or args.tsv or args.max_boxes is not None:
                prep.error(f"{CLIP_GRID} reads --images (not --tsv or --max-boxes)")
        elif not args.tsv or args.images:
            prep.error("the following arguments are required: --tsv (--images is for clip-grid)")
        return _prepare_command(args)
    if args.command == "export":
        return _export_command(args, console)
    if args.command == "backbones":
        return _backbones_command(args, console)
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
        from vlcompress.preflight import preflight

        problems = preflight(cfg)
        if problems:
            print(f"error: {ConfigError(problems, f'experiment {args.exp!r}')}", file=sys.stderr)
            return 2
        print(f"experiment {args.exp!r} is valid (options, paths, data and callbacks checked)")
        return 0

    from vlcompress.callbacks import NonFiniteLossError
    from vlcompress.data.vqa_files import MissingInputsError
    from vlcompress.run import RunInterrupted, run_experiment

    try:
        results = run_experiment(cfg, raw, overrides=args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MissingInputsError as e:  # data that went missing after the preflight check
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NonFiniteLossError) as e:  # during the run
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "stopped: interrupted (SIGINT) before training began; nothing to resume",
            file=sys.stderr,
        )
        return 130
    if results:
        console.print(results_table(results))
    return 0
