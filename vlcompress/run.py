"""Run an experiment: config -> data -> model (+ anatomy) -> task -> callbacks -> run folder.

The run folder holds ``config.yaml`` (resolved), ``checkpoints/{last,best}.ckpt`` (atomic
writes), ``metrics.csv``, ``tensorboard/``, ``data_report.json``, ``results.json``,
``curves.png`` and ``run.log``.

A run may start from an earlier run's model weights (``init_from``, a pipeline stage; see
:mod:`vlcompress.utils.init_from`); ``results.json`` and ``run.json`` then record the checkpoint
file and its SHA-256 under ``init_from``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shlex
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from vlcompress import registry
from vlcompress.backbones import backbone_output_dir
from vlcompress.callbacks import FiniteLossGuard, collect_report_rows, collect_reports
from vlcompress.cluster.environment import (
    RUN_DIR_ENV,
    global_rank,
    launch_folder_name,
    resolve_devices,
)
from vlcompress.config import ComponentConfig, ConfigError, ExperimentConfig
from vlcompress.data.contract import check_data_contract
from vlcompress.metrics.blind import BLIND_MARGIN, blind_check
from vlcompress.models import contract
from vlcompress.preflight import preflight
from vlcompress.utils.checkpoint_io import AtomicCheckpointIO
from vlcompress.utils.csv_history import HistoryCSVLogger
from vlcompress.utils.flops import count_parameters, flops_per_sample
from vlcompress.utils.init_from import apply_init_checkpoint, resolve_init_path
from vlcompress.utils.io import atomic_write_json, atomic_write_text
from vlcompress.utils.mappings import flatten
from vlcompress.utils.plots import plot_training_curves
from vlcompress.utils.run_folder import RESUMABLE_KEYS, RunFolder, RunFolderError, config_changes
from vlcompress.utils.run_guard import RunGuard

log = logging.getLogger(__name__)


def build_datamodule(cfg: ComponentConfig, seed: int) -> L.LightningDataModule:
    """The configured data module, set up (vocabularies are needed to size the model).

    Raises:
        ConfigError: when the module does not fulfil the data contract.
    """
    dm = registry.build("datamodule", cfg.name, cfg.options, seed=seed)
    dm.prepare_data()
    dm.setup("fit")
    problems = check_data_contract(dm)
    if problems:
        raise ConfigError([f"data: {p}" for p in problems])
    return dm


def build_task(cfg: ExperimentConfig, dm: Any) -> L.LightningModule:
    """The configured model, loss and task around the data module's answers and prior."""
    info = dm.info()
    model = registry.build(
        "model",
        cfg.model.name,
        cfg.model.options,
        vocab_size=info.vocab_size,
        num_answers=len(info.answers),
    )
    problem = contract.pair_problem(model, cfg.model.name, info.visual_input)
    if problem:
        raise ConfigError([problem])
    o = asdict(cfg.optim)
    o.pop("grad_clip")
    return registry.build(
        "task",
        cfg.task.name,
        cfg.task.options,
        model=model,
        answers=info.answers,
        loss=registry.build("loss", cfg.loss.name, cfg.loss.options),
        optimizer=o,
        scheduler=asdict(cfg.scheduler),
        answer_types=info.answer_types,
        question_types=info.question_types,
        question_type_prior=info.question_type_prior,
    )


def build_callbacks(cfg: ExperimentConfig, ckpt_dir: Path) -> list[Callback]:
    """Checkpointing, the NaN guard (the experiment's own, or a default one), the progress bar
    and the experiment's callbacks, each built from the registry. Callbacks are told that they
    run inside a vlcompress run (``within_vlcompress_run``), so their advice names config keys."""
    own = [registry.build("callback", c.name, c.options) for c in cfg.callbacks]
    cbs: list[Callback] = [
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="best", monitor="val/acc", mode="max",
            save_top_k=1, auto_insert_metric_name=False,
        ),
        # last.ckpt on its own: Lightning's save_last only refreshes it when best.ckpt changes,
        # so an epoch that did not improve would be lost to a resume
        ModelCheckpoint(
            dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
            enable_version_counter=False, auto_insert_metric_name=False,
        ),
    ]  # fmt: skip
    if not any(isinstance(cb, FiniteLossGuard) for cb in own):
        cbs.append(FiniteLossGuard())
    if cfg.progress_bar:
        cbs.append(RichProgressBar(leave=True))
    for cb in cbs + own:
        if hasattr(cb, "within_vlcompress_run"):
            cb.within_vlcompress_run = True
    return cbs + own


def processes(devices: Any, num_nodes: Any) -> int:
    """How many processes share the training data (Lightning's ``devices`` x ``num_nodes``;
    ``auto`` devices: every visible GPU, else one process)."""
    if isinstance(devices, (list, tuple)):
        per_node = len(devices)
    elif str(devices).isdigit():
        per_node = int(devices)
    else:  # auto / -1
        per_node = max(1, torch.cuda.device_count())
    return max(1, per_node) * (int(num_nodes) if str(num_nodes).isdigit() else 1)


def log_interval(trainer_cfg: Any, dm: Any, world: int = 1) -> int:
    """``trainer.log_every_n_steps``; unset (``null``), about 50 points over the whole run and
    at most every 50 steps, so that a short run still draws a training curve (``world``
    processes share each epoch's batches)."""
    if trainer_cfg.log_every_n_steps is not None:
        return int(trainer_cfg.log_every_n_steps)
    try:
        batches = math.ceil(len(dm.train_dataloader()) / world)
    except TypeError:  # an iterable without a length
        return 50
    limit = trainer_cfg.limit_train_batches
    batches = int(batches * limit) if isinstance(limit, float) else min(batches, int(limit))
    steps = max(1, batches) * trainer_cfg.max_epochs
    if trainer_cfg.max_steps and trainer_cfg.max_steps > 0:
        steps = min(steps, trainer_cfg.max_steps)
    return max(1, min(50, steps // 50))


def stop_report(trainer: L.Trainer, trainer_cfg: Any) -> dict[str, Any]:
    """How training ended: steps done of steps planned, and what stopped it (``completed``,
    ``max_time`` or ``early_stop``: a callback set ``trainer.should_stop``), with a one-line
    message for the log and the results table."""
    done = int(trainer.global_step)
    try:
        planned = int(trainer.estimated_stepping_batches)
    except Exception:  # noqa: BLE001 - an infinite or unsized loader
        planned = None
    epochs = f"{trainer.current_epoch} of {trainer_cfg.max_epochs} epochs"
    out: dict[str, Any] = {"steps": done, "steps_planned": planned, "epochs": trainer.current_epoch}
    if planned is None or done >= planned:
        return {**out, "stopped_by": "completed", "message": f"{done} steps, {epochs}"}
    timer = next((c for c in trainer.callbacks if type(c).__name__ == "Timer"), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    if trainer_cfg.max_time and remaining is not None and remaining <= 0:
        why = "max_time"
        message = (
            f"stopped by trainer.max_time={trainer_cfg.max_time} after {done} of {planned} steps "
            f"({epochs}); raise trainer.max_time (or set it to null) to train the whole plan"
        )
    else:
        why = "early_stop"
        message = f"stopped early by a callback after {done} of {planned} steps ({epochs})"
    return {**out, "stopped_by": why, "message": message}


def resolve_output_dir(cfg: ExperimentConfig) -> Path:
    """The run folder, the same on every rank of one launch: ``output_dir``; else, for a
    backbone recipe (``experiments/backbones/<name>``), ``<backbones dir>/<name>``; else the folder
    rank 0 chose (inherited by the processes Lightning starts); else ``runs/<name>/slurm-<job>``
    or ``torchrun-<run id>`` under a multi-process launcher; else ``runs/<name>/<timestamp>``.

    Raises:
        ConfigError: ``resume=true`` without ``output_dir``, or a multi-process launch whose
            ranks cannot agree on a folder by themselves.
    """
    if cfg.output_dir:
        return Path(cfg.output_dir)
    backbone = backbone_output_dir(cfg.name)
    if backbone is not None:  # experiments/backbones/<name>: the backbone's own folder
        return backbone
    if cfg.resume:
        raise ConfigError(["resume=true needs output_dir=<the run folder to resume>"])
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited:
        return Path(inherited)
    name = launch_folder_name()
    if name:
        return Path("runs") / cfg.name / name
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            [
                "this is one process of a multi-process launch without a job id: give every "
                "process the same output_dir=<folder> (or torchrun --rdzv-id=<id>)"
            ]
        )
    return Path("runs") / cfg.name / datetime.now().strftime("%Y%m%d-%H%M%S")


def _checkpoint_config(ckpt: Path) -> tuple[dict[str, Any] | None, int]:
    """The configuration and global step stored in a checkpoint.

    Raises:
        ConfigError: the checkpoint cannot be read (damaged by a killed write, or not a
            checkpoint), naming the file and the way out.
    """
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError(
            [
                f"cannot read the checkpoint {ckpt} ({type(e).__name__}: {e}); it is damaged or "
                f"not a checkpoint. Resume from another one by copying it over it (e.g. "
                f"{ckpt.parent / 'best.ckpt'}), or start afresh with another output_dir="
            ]
        ) from e
    return state.get("vlcompress_config"), int(state.get("global_step", 0))


def _requeued_checkpoint(out: Path) -> Path | None:
    """Lightning's checkpoint of a Slurm job that was requeued (``hpc_ckpt_<n>.ckpt``)."""
    found = sorted(out.glob("hpc_ckpt_*.ckpt"), key=lambda p: int(p.stem.rsplit("_", 1)[-1]))
    return found[-1] if found else None


def _attach_file_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("vlcompress", "lightning.pytorch"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("vlcompress").setLevel(logging.INFO)
    return handler


class RunInterrupted(Exception):
    """The run was stopped by a signal after saving a checkpoint.

    Attributes:
        exit_code: 143 for SIGTERM, 130 for SIGINT (what a shell reports for that signal).
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resume_command(cfg: ExperimentConfig, out: Path, overrides: list[str] | None) -> str:
    """The command that continues this run exactly."""
    keep = [o for o in overrides or [] if not o.startswith(("resume=", "output_dir="))]
    args = [cfg.name, *keep, "resume=true", f"output_dir={out}"]
    return "python -m vlcompress train " + " ".join(shlex.quote(a) for a in args)


def _check_resumed_config(out: Path, ckpt: Path, resolved: dict[str, Any]) -> int:
    """Compare the run's configuration with the checkpoint's before anything is written;
    returns the checkpoint's global step.

    Raises:
        ConfigError: naming every key that differs and may not change on resume.
    """
    stored, step = _checkpoint_config(ckpt)
    if stored is None and (out / "config.yaml").is_file():  # checkpoints of older versions
        stored = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"), resolve=True)
    changes = config_changes(stored or {}, resolved) if stored else []
    if changes:
        raise ConfigError(
            [f"resume: {c} (the checkpoint's run has the first value)" for c in changes]
            + [
                f"a resumed run must be the same experiment; only {', '.join(RESUMABLE_KEYS)} "
                "may change. Start a new run (another output_dir=) to change the others."
            ]
        )
    return step


def _no_checkpoint_message(out: Path, ckpt: Path) -> str:
    """Why ``resume=true`` cannot continue the run in ``out``, and what to do instead."""
    if not out.is_dir():
        return (
            f"resume=true but the run folder {out} does not exist; start the run without "
            "resume=true (check output_dir=)"
        )
    attempt = RunFolder(out).unfinished_attempt()
    if attempt is not None:
        error = f": {attempt['error']}" if attempt["error"] else ""
        return (
            f"resume=true but {out} holds no checkpoint: its run {attempt['ended']} before "
            f"saving one{error}. Nothing can be resumed; run the same command without "
            "resume=true to start again (the failed attempt is kept as "
            f"{out.name}.failed-<time>), or give overwrite=true"
        )
    return (
        f"resume=true but {ckpt} does not exist; start a new run without resume=true (another "
        "output_dir=, or overwrite=true to move the folder's content aside)"
    )


def _recorded_init_from(out: Path) -> dict[str, Any] | None:
    """The ``init_from`` record of an earlier launch of this run (``run.json``), if any."""
    try:
        return json.loads((out / "run.json").read_text()).get("init_from")
    except (OSError, ValueError):
        return None


def _write_config(out: Path, text: str) -> None:
    """Write ``config.yaml``; a different earlier one is kept as ``config.<time>.yaml``."""
    path = out / "config.yaml"
    if path.is_file() and path.read_text() != text:
        path.rename(out / f"config.{datetime.now().strftime('%Y%m%d-%H%M%S')}.yaml")
    atomic_write_text(path, text)


@dataclass(frozen=True)
class RunPlan:
    """What one launch of a run does, decided before anything is written.

    Attributes:
        out: the run folder.
        resolved: the resolved configuration (plain types; stored in every checkpoint).
        ckpt: the checkpoint this launch continues (``resume=true`` or a requeued Slurm job),
            or ``None`` for a fresh start.
        resume_step: that checkpoint's global step (``None``: fresh start).
        init_path: the checkpoint whose model weights a fresh start begins from (``init_from``).
        devices, num_nodes: the resolved Lightning ``devices`` / ``num_nodes``.
    """

    out: Path
    resolved: dict[str, Any]
    ckpt: Path | None
    resume_step: int | None
    init_path: Path | None
    devices: Any
    num_nodes: int


def plan_run(cfg: ExperimentConfig, raw: DictConfig) -> RunPlan:
    """Phase 1: the run folder, what to resume, the preflight and the launch, on every rank
    alike (so all ranks stop alike); nothing is written.

    Raises:
        ConfigError: a bad resume, a preflight problem, a checkpoint of another experiment or
            a launch that contradicts its settings.
    """
    out = resolve_output_dir(cfg)
    resolved = OmegaConf.to_container(raw, resolve=True)
    last = out / "checkpoints" / "last.ckpt"
    found = [p for p in (last, _requeued_checkpoint(out) if out.is_dir() else None) if p]
    found = [p for p in found if p.is_file()]
    requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0  # Slurm restarted this job
    ckpt = None
    if cfg.resume or (requeued and found):  # the newest: last.ckpt or Lightning's hpc_ckpt
        ckpt = max(found, key=lambda p: p.stat().st_mtime) if found else last
    if cfg.resume and not ckpt.is_file():
        raise ConfigError([_no_checkpoint_message(out, ckpt)])
    problems = preflight(cfg, resuming=ckpt is not None)
    if problems:
        raise ConfigError(problems, f"experiment {cfg.name!r}")
    resume_step = _check_resumed_config(out, ckpt, resolved) if ckpt is not None else None
    if cfg.init_from and ckpt is not None:
        log.info("resuming %s: its own checkpoint wins over init_from=%s", ckpt, cfg.init_from)
    init_path = resolve_init_path(cfg.init_from) if cfg.init_from and ckpt is None else None
    try:
        devices, num_nodes = resolve_devices(cfg.trainer.devices, cfg.trainer.num_nodes)
    except ValueError as e:
        raise ConfigError([str(e)]) from e
    return RunPlan(out, resolved, ckpt, resume_step, init_path, devices, num_nodes)


@contextlib.contextmanager
def claimed_folder(
    cfg: ExperimentConfig, plan: RunPlan, raw: DictConfig, overrides: list[str] | None
) -> Iterator[RunFolder]:
    """Phase 2: the run folder's lifetime. Rank 0 claims it (lock, ``config.yaml``, log file,
    ``run.json`` status ``running``); the status follows how the block ends (``failed``, or
    ``interrupted`` by Ctrl-C before training; a signal during training is recorded where it
    is caught); the lock, the log file and the process group are released whatever happens.

    Raises:
        ConfigError: the folder cannot be claimed (another run, a live lock, not writable).
    """
    rank, out = global_rank(), plan.out
    folder = RunFolder(out)
    handler: logging.Handler | None = None
    set_env = False
    if rank == 0:
        try:
            folder.claim(resume=plan.ckpt is not None, overwrite=cfg.overwrite)
        except RunFolderError as e:
            raise ConfigError([str(e)]) from e
        if os.environ.get(RUN_DIR_ENV) != str(out):
            os.environ[RUN_DIR_ENV], set_env = str(out), True
        handler = _attach_file_log(out)
        _write_config(out, OmegaConf.to_yaml(raw, resolve=True))
        folder.set_status(
            "running",
            command=resume_command(cfg, out, overrides),
            resumed_from=str(plan.ckpt or ""),
        )
    try:
        yield folder
    except RunInterrupted:
        raise
    except KeyboardInterrupt:  # before training began: nothing was saved
        if rank == 0:
            folder.set_status("interrupted", signal="SIGINT", exit_code=130)
        raise
    except BaseException as e:
        if rank == 0:
            folder.set_status("failed", error=f"{type(e).__name__}: {e}"[:2000])
        raise
    finally:
        if set_env:
            os.environ.pop(RUN_DIR_ENV, None)
        if handler is not None:
            for name in ("vlcompress", "lightning.pytorch"):
                logging.getLogger(name).removeHandler(handler)
            handler.close()
        folder.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # else gloo may abort at exit


def _quiet_known_warnings(resuming: bool) -> None:
    """Silence Lightning warnings that say nothing a user of a run can act on."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*ended before the epoch ended.*")  # resumable
    # Lightning's own use of torch's deprecated pytree LeafSpec; nothing a user can change
    warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated", category=FutureWarning)
    if resuming:
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


def build_trainer(cfg: ExperimentConfig, plan: RunPlan, dm: Any, guard: RunGuard) -> L.Trainer:
    """Phase 3: the Lightning trainer: checkpoints, the run's callbacks and ``guard``, the CSV
    history and TensorBoard loggers, atomic checkpoint writes."""
    ckpt_dir = plan.out / "checkpoints"
    t = {**asdict(cfg.trainer), "devices": plan.devices, "num_nodes": plan.num_nodes}
    t["log_every_n_steps"] = log_interval(cfg.trainer, dm, processes(plan.devices, plan.num_nodes))
    return L.Trainer(
        **t,
        default_root_dir=plan.out,
        callbacks=[*build_callbacks(cfg, ckpt_dir), guard],
        logger=[
            HistoryCSVLogger(plan.out, plan.resume_step),
            TensorBoardLogger(plan.out, name="tensorboard", version=""),
        ],
        plugins=[AtomicCheckpointIO()],
        gradient_clip_val=cfg.optim.grad_clip or None,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
    )


@dataclass(frozen=True)
class Fitted:
    """What fit and test leave for the results: this launch's fit time, how training ended
    (:func:`stop_report`) and the best checkpoint (tested)."""

    fit_time_s: float
    stop: dict[str, Any]
    best: str


def fit_and_test(
    cfg: ExperimentConfig,
    plan: RunPlan,
    trainer: L.Trainer,
    task: L.LightningModule,
    dm: Any,
    guard: RunGuard,
    folder: RunFolder,
    overrides: list[str] | None,
) -> Fitted:
    """Phase 4: fit (from ``plan.ckpt`` when resuming), then test the best checkpoint.

    Raises:
        RunInterrupted: SIGTERM / SIGINT stopped training after ``last.ckpt`` was saved (the
            status and the exact resume command recorded).
    """
    t_fit = time.time()
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=str(plan.ckpt) if plan.ckpt else None)
        fit_time = time.time() - t_fit
        stop = stop_report(trainer, cfg.trainer)
        if stop["stopped_by"] != "completed" and trainer.is_global_zero:
            log.warning("%s", stop["message"])
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(task, datamodule=dm, ckpt_path=best or None, verbose=False)
    except SystemExit as e:  # Lightning turns SIGTERM / Ctrl-C into SystemExit
        if guard.interrupted is None:
            raise
        code = 143 if guard.interrupted == "SIGTERM" else 130
        message = (
            f"interrupted by {guard.interrupted} at epoch {trainer.current_epoch}, global "
            f"step {trainer.global_step}; checkpoint saved: {plan.out / 'checkpoints' / 'last.ckpt'}\n"
            f"resume exactly with:\n  {resume_command(cfg, plan.out, overrides)}"
        )
        if global_rank() == 0:
            folder.set_status("interrupted", signal=guard.interrupted, exit_code=code)
        raise RunInterrupted(message, code) from e
    return Fitted(fit_time, stop, best)


def collect_results(
    cfg: ExperimentConfig,
    plan: RunPlan,
    trainer: L.Trainer,
    task: L.LightningModule,
    dm: Any,
    guard: RunGuard,
    fitted: Fitted,
    init_record: Any,
    t_start: float,
) -> dict[str, Any]:
    """Phase 5 (rank 0): ``results.json``'s content: test accuracies, data and blind
    baselines, callback sections, costs, wall time, how training ended, environment."""
    sample = next(iter(dm.val_dataloader()))
    best_score = trainer.checkpoint_callback.best_model_score
    data = {
        "name": cfg.data.name,
        "split": dm.split_report.get("split"),
        **dm.split_report.get("sizes", {}),
        "mean_tv_distance": dm.split_report.get("mean_tv_distance"),
        "prior_baseline": dm.split_report.get("prior_baseline"),
        "anti_prior_baseline": dm.split_report.get("anti_prior_baseline"),
        "blind_balanced_baseline": dm.split_report.get("blind_balanced_baseline"),
    }
    blind = blind_check(task.test_report or {}, data, dm.split_report.get("per_question_type"))
    if blind and blind["blind_question_types"] and not blind["answers_without_image"]:
        log.warning(
            "%s: this run answers %d question type(s) without the image (%s): their balanced "
            "accuracy is within %.2f of a constant answer's",
            cfg.name, len(blind["blind_question_types"]), ", ".join(blind["blind_question_types"]),
            BLIND_MARGIN,
        )  # fmt: skip
    if blind and blind["answers_without_image"]:
        log.warning(
            "%s: this run answers without the image: its balanced accuracy %.3f is within %.2f "
            "of what a constant answer per question type reaches (%.3f); its accuracy comes "
            "from the question alone",
            cfg.name, blind["balanced_accuracy"], BLIND_MARGIN, blind["blind_balanced_baseline"],
        )  # fmt: skip
    return {
        "experiment": cfg.name,
        "model": cfg.model.name,
        "data": data,
        "test": task.test_report,
        "blind": blind,
        "callbacks": collect_reports(trainer.callbacks),
        "callback_rows": [list(r) for r in collect_report_rows(trainer.callbacks)],
        "best_val_accuracy": float(best_score) if best_score is not None else None,
        "parameters": count_parameters(task.model),
        "flops_per_sample": flops_per_sample(task.model.to("cpu"), sample),
        "train_wall_time_s": round(guard.train_time_s, 2),
        "this_launch_train_wall_time_s": round(fitted.fit_time_s, 2),
        "training": fitted.stop,
        "total_wall_time_s": round(time.time() - t_start, 2),
        "epochs": trainer.current_epoch,
        "global_steps": trainer.global_step,
        "best_checkpoint": fitted.best,
        "init_from": (init_record.to_dict() if init_record else _recorded_init_from(plan.out)),
        "output_dir": str(plan.out),
        "environment": {
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "device": str(trainer.strategy.root_device),
            "threads": torch.get_num_threads(),
        },
    }


def save_published_layout(cfg: ExperimentConfig, task: L.LightningModule, out: Path) -> None:
    """A backbone run (``experiments/backbones/``) whose model saves itself in its published
    layout (``save_pretrained``, e.g. ViLT's ``dandelin/vilt-b32-*`` folder) writes its tested
    weights to ``<run>/pretrained``, which ``model.options.pretrained: backbone:<name>`` loads
    through the model's own checkpoint loader."""
    from vlcompress.backbones import backbone_output_dir

    save = getattr(task.model, "save_pretrained", None)
    if save is None or backbone_output_dir(cfg.name) is None:
        return
    folder = save(out / "pretrained")
    log.info("backbone weights in the model's published layout: %s", folder)


def run_experiment(
    cfg: ExperimentConfig, raw: DictConfig | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Train, test and write the run folder; returns the results (also in ``results.json``).

    Works the same in one process and as every rank of a DDP launch (Lightning's own, ``srun``
    or ``torchrun``): all ranks use one run folder, only rank 0 writes files. The phases:
    :func:`plan_run`, :func:`claimed_folder`, set-up (data, task, ``init_from``),
    :func:`build_trainer`, :func:`fit_and_test`, :func:`collect_results`.

    Args:
        cfg: the validated experiment.
        raw: its merged OmegaConf tree (written as ``config.yaml``).
        overrides: the command-line overrides (for the resume command printed on a signal).

    Raises:
        ConfigError: a bad run folder, resume or launch (one message naming the fix).
        RunInterrupted: SIGTERM / SIGINT stopped the run after saving a checkpoint.
    """
    t_start = time.time()
    raw = raw if raw is not None else OmegaConf.structured(cfg)
    plan = plan_run(cfg, raw)
    out = plan.out
    with claimed_folder(cfg, plan, raw, overrides) as folder:
        _quiet_known_warnings(plan.ckpt is not None)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
            # Lightning's DDP launcher sets its own thread count unless OMP_NUM_THREADS is set.
            os.environ["OMP_NUM_THREADS"] = str(cfg.threads)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dm = build_datamodule(cfg.data, cfg.seed)
        task = build_task(cfg, dm)
        init_record = None
        if plan.init_path is not None:
            init_record = apply_init_checkpoint(
                task, plan.resolved, plan.init_path, grow=bool(plan.resolved.get("init_grow"))
            )
            if global_rank() == 0:
                folder.set_status("running", init_from=init_record.to_dict())
        guard = RunGuard(str(out / "checkpoints"), plan.resolved)
        trainer = build_trainer(cfg, plan, dm, guard)
        if trainer.is_global_zero:
            atomic_write_json(out / "data_report.json", dm.split_report)
            log.info("run folder: %s", out.resolve())
            trainer.loggers[1].log_hyperparams(flatten(plan.resolved))  # tensorboard/hparams.yaml
        fitted = fit_and_test(cfg, plan, trainer, task, dm, guard, folder, overrides)
        if not trainer.is_global_zero:
            return {}
        results = collect_results(cfg, plan, trainer, task, dm, guard, fitted, init_record, t_start)
        atomic_write_json(out / "results.json", results)
        save_published_layout(cfg, task, out)
        plot_training_curves(
            out / "metrics.csv", out / "curves.png", title=f"{cfg.name} ({cfg.model.name})"
        )
        folder.set_status("finished", exit_code=0)
        log.info("results written to %s", out / "results.json")
        return results
