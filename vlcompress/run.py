"""Run an experiment: config -> data -> model (+ anatomy) -> task -> callbacks -> run folder.

The run folder holds ``config.yaml`` (resolved), ``checkpoints/{last,best}.ckpt`` (atomic
writes), ``metrics.csv``, ``tensorboard/``, ``data_report.json``, ``results.json``,
``curves.png`` and ``run.log``.
"""

from __future__ import annotations

import csv
import io
import logging
import platform
import time
import warnings
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from vlcompress import registry
from vlcompress.callbacks import FiniteLossGuard, collect_report_rows, collect_reports
from vlcompress.config import ComponentConfig, ConfigError, ExperimentConfig
from vlcompress.data.contract import check_data_contract
from vlcompress.utils.checkpoint_io import AtomicCheckpointIO
from vlcompress.utils.flops import count_parameters, flops_per_sample
from vlcompress.utils.io import atomic_write_json, atomic_write_text
from vlcompress.utils.plots import plot_training_curves

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
            save_last=True, save_top_k=1, auto_insert_metric_name=False,
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


def resolve_output_dir(cfg: ExperimentConfig) -> Path:
    """``output_dir`` or ``runs/<name>/<timestamp>``; checks ``resume`` has something to resume.

    Raises:
        ConfigError: when ``resume=true`` but no ``checkpoints/last.ckpt`` exists there.
    """
    if cfg.output_dir:
        out = Path(cfg.output_dir)
    else:
        if cfg.resume:
            raise ConfigError(["resume=true needs output_dir=<the run folder to resume>"])
        out = Path("runs") / cfg.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    if cfg.resume and not (out / "checkpoints" / "last.ckpt").is_file():
        raise ConfigError(
            [
                f"resume=true but {out / 'checkpoints' / 'last.ckpt'} does not exist; run without resume first"
            ]
        )
    return out


def _keep_metrics_history(out: Path, ckpt: Path | None) -> list[dict[str, str]]:
    """Rows of an earlier ``metrics.csv`` up to the checkpoint's step (Lightning's CSV logger
    deletes the file when a run folder is reused, which would lose a resumed run's history)."""
    path = out / "metrics.csv"
    if ckpt is None or not path.is_file():
        return []
    step = int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("step") and int(float(r["step"])) <= step]
    path.unlink()
    return rows


def _merge_metrics_history(out: Path, earlier: list[dict[str, str]]) -> None:
    if not earlier:
        return
    path = out / "metrics.csv"
    later = list(csv.DictReader(path.open())) if path.is_file() else []
    keys = sorted({k for r in earlier + later for k in r})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(earlier + later)
    atomic_write_text(path, buf.getvalue())


def _attach_file_log(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("vlcompress", "lightning.pytorch"):
        logging.getLogger(name).addHandler(handler)
    logging.getLogger("vlcompress").setLevel(logging.INFO)
    return handler


def run_experiment(cfg: ExperimentConfig, raw: DictConfig | None = None) -> dict[str, Any]:
    """Train, test and write the run folder; returns the results (also in ``results.json``)."""
    t_start = time.time()
    out = resolve_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    handler = _attach_file_log(out)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        raw = raw if raw is not None else OmegaConf.structured(cfg)
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(raw, resolve=True))
        dm = build_datamodule(cfg.data, cfg.seed)
        task = build_task(cfg, dm)
        ckpt_dir = out / "checkpoints"
        callbacks = build_callbacks(cfg, ckpt_dir)
        t = cfg.trainer
        trainer = L.Trainer(
            **{k: v for k, v in asdict(t).items()},
            default_root_dir=out,
            callbacks=callbacks,
            logger=[
                CSVLogger(out, name="", version=""),
                TensorBoardLogger(out, name="tensorboard", version=""),
            ],
            plugins=[AtomicCheckpointIO()],
            gradient_clip_val=cfg.optim.grad_clip or None,
            enable_progress_bar=cfg.progress_bar,
            enable_model_summary=False,
        )
        ckpt_path = str(ckpt_dir / "last.ckpt") if cfg.resume else None
        earlier = (
            _keep_metrics_history(out, Path(ckpt_path) if ckpt_path else None)
            if trainer.is_global_zero
            else []
        )
        if trainer.is_global_zero:
            atomic_write_json(out / "data_report.json", dm.split_report)
            log.info("run folder: %s", out.resolve())
        t_fit = time.time()
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
        fit_time = time.time() - t_fit
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(task, datamodule=dm, ckpt_path=best or None, verbose=False)
        if trainer.is_global_zero:
            _merge_metrics_history(out, earlier)
        results: dict[str, Any] = {}
        if trainer.is_global_zero:
            sample = next(iter(dm.val_dataloader()))
            best_score = trainer.checkpoint_callback.best_model_score
            results = {
                "experiment": cfg.name,
                "model": cfg.model.name,
                "data": {
                    "name": cfg.data.name,
                    "split": dm.split_report.get("split"),
                    **dm.split_report.get("sizes", {}),
                    "mean_tv_distance": dm.split_report.get("mean_tv_distance"),
                },
                "test": task.test_report,
                "callbacks": collect_reports(trainer.callbacks),
                "callback_rows": [list(r) for r in collect_report_rows(trainer.callbacks)],
                "best_val_accuracy": float(best_score) if best_score is not None else None,
                "parameters": count_parameters(task.model),
                "flops_per_sample": flops_per_sample(task.model.to("cpu"), sample),
                "train_wall_time_s": round(fit_time, 2),
                "total_wall_time_s": round(time.time() - t_start, 2),
                "epochs": trainer.current_epoch,
                "global_steps": trainer.global_step,
                "best_checkpoint": best,
                "output_dir": str(out),
                "environment": {
                    "torch": torch.__version__,
                    "lightning": L.__version__,
                    "python": platform.python_version(),
                    "device": str(trainer.strategy.root_device),
                    "threads": torch.get_num_threads(),
                },
            }
            atomic_write_json(out / "results.json", results)
            plot_training_curves(
                out / "metrics.csv", out / "curves.png", title=f"{cfg.name} ({cfg.model.name})"
            )
            log.info("results written to %s", out / "results.json")
        return results
    finally:
        for name in ("vlcompress", "lightning.pytorch"):
            logging.getLogger(name).removeHandler(handler)
        handler.close()
