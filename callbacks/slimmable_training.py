"""``SlimmableTraining``: train one model for many widths and depths at once (the Bilaterally
Slimmable Transformer, seed 001), evaluate every submodel, report accuracy against cost."""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlcompress.callbacks.base import CompressionCallback
from vlcompress.compress.slimmable import Slimmable, Submodel, logits_in, parse_space
from vlcompress.registry import register

__all__ = ["SlimmableTraining", "distillation_loss"]

log = logging.getLogger(__name__)

DISTILL = ("teacher", "inplace", "none")
LOSSES = ("bce", "kl")
EVALUATE = ("all", "ends", "full")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``bce``: binary cross-entropy to ``sigmoid(teacher)``, summed over answers and averaged
    over the batch (BST on VQA); ``kl``: KL(softmax(teacher) || softmax(student)), averaged over
    the batch (BST on GQA)."""
    if kind not in LOSSES:
        raise ValueError(f"distillation loss must be one of {LOSSES}, got {kind!r}")
    if kind == "bce":
        target = torch.sigmoid(teacher)
        loss = F.binary_cross_entropy_with_logits(student, target, reduction="sum")
        return loss / student.shape[0]
    return F.kl_div(
        F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip


_LOGITS_FN_EXAMPLE = (
    "logits_fn=lambda pl_module, output: pl_module.head(output.last_hidden_state[:, 0]) "
    "(what your training_step does with the model's output)"
)


def _logits(output: Any) -> torch.Tensor:
    """The logits in a model output: the tensor itself, the first item of a tuple, or
    ``.logits``."""
    logits = logits_in(output)
    if logits is not None:
        return logits
    raise TypeError(
        f"SlimmableTraining: cannot find the logits in the model's output "
        f"({type(output).__name__}): a classifier outside the model? Give "
        f"SlimmableTraining({_LOGITS_FN_EXAMPLE}); or make the model return a tensor, a tuple "
        "starting with it, or an object with .logits."
    )


def _returns_hidden_states(model: nn.Module) -> bool:
    """A Hugging Face base model (``BertModel``, ``ViltModel``): its output holds hidden
    states, not logits (``...For...`` classes have a head and return ``.logits``)."""
    cls = type(model)
    return cls.__module__.startswith("transformers.") and "For" not in cls.__name__


def _one_example(obj: Any) -> Any:
    """The first example of a model input (tensors, dataclass batches, containers)."""
    from vlcompress.utils.flops import resize_batch

    if isinstance(obj, torch.Tensor):
        return obj[:1] if obj.dim() else obj
    if is_dataclass(obj) and not isinstance(obj, type):
        return resize_batch(obj, 1)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_one_example(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _one_example(v) for k, v in obj.items()}
    return obj


@register("callback", "slimmable_training")
class SlimmableTraining(CompressionCallback):
    """Sandwich training of every (width, depth) submodel of one model, with distillation.

    Each training step runs several submodels of :attr:`space` on the batch — the largest and
    the smallest (``include_ends``) plus ``sample`` others drawn at random — and adds their
    losses, so one optimiser step takes the sum of their gradients (as BST's backward per
    submodel does; the graphs are held together, one backward). A submodel's loss is
    ``gt_weight x`` the task's own loss plus the distillation loss to the targets:

    * ``distill="teacher"`` — a fixed teacher (the full model loaded from ``teacher``, a
      checkpoint or run folder; BST: the student starts from the teacher's weights,
      ``init_from_teacher``; ground truth unused, ``gt_weight=0``);
    * ``distill="inplace"`` — the largest submodel of the step learns from the task loss and
      the others from its detached logits;
    * ``distill="none"`` — every submodel learns from the task loss.

    Width and depth are switched by :class:`~vlcompress.compress.slimmable.Slimmable` through
    the anatomy (weight slicing and in-place layer skipping), so any anatomy-declared model
    works and nothing about checkpoints changes. The sampled submodels come from a generator
    seeded by the callback's seed and the global step: the same on every DDP rank and again
    after a resume.

    Validation and test evaluate the submodels of ``evaluate`` (``all`` of the space, its two
    ``ends``, or only the ``full`` model) on every batch, log ``slim/<key>/val_acc`` and
    ``slim/<key>/test_acc``, and report a table (accuracy, parameters, MACs, FLOPs per example
    at the batch's input size) in ``results.json``, with a plot of accuracy against MACs
    (``slimmable.png`` in the run folder). Per-example scores come from the LightningModule's
    ``example_scores(logits, batch)`` (``VQATask``: the official VQA accuracy), else top-1
    accuracy against ``batch.targets`` / ``batch["labels"]`` / the last item of a tuple batch
    ``(inputs, labels)``.

    In your own project the slimmed module is ``pl_module.model`` (or ``model_attr``) and its
    forward hook sees every call your ``training_step`` / ``validation_step`` makes:

    * **a head outside the model** (``self.model = BertModel(cfg)``, ``self.head =
      nn.Linear(...)``, the step calls ``self.head(self.model(...).last_hidden_state[:, 0])``)
      works at every width: the outputs a narrower submodel leaves narrower are zero-padded
      back to the full hidden size at the model's boundary (``Slimmable(pad_outputs=True)``),
      which is exactly the outside head reading its first input features;
    * **the logits** (to distil and to evaluate the submodels) are the model's output when it
      is a tensor, a tuple starting with one or has ``.logits``; otherwise give ``logits_fn``,
      ``(pl_module, model_output) -> logits``, doing what your step does with the model's
      output (``lambda pl, out: pl.head(out.last_hidden_state[:, 0])``; a module-level function
      under ``ddp_spawn``, which pickles callbacks). A teacher (``distill="teacher"``) is a copy
      of the slimmed module only: ``logits_fn`` gives its logits through your module's current
      head;
    * **width slimming** needs a width region in the anatomy (recognised Hugging Face text
      encoders have one; MCAN needs ``width_adapters: true``); models whose patch embedding is a
      convolution (ViLT, timm ViT) are slimmed by depth only: a space with widths of 1, e.g.
      ``[[1, '1/2'], [1, 1]]``. :meth:`preflight` reports what is missing before training.

    Differences from MILVLG/bst, on purpose: the sampled submodels' losses are added and
    back-propagated once (the same gradients as BST's backward per submodel, but the graphs
    are held together: about ``k`` times the activation memory); the losses are averaged over
    the batch (BST sums them; Adam is nearly insensitive to the scale); the submodels are drawn
    per optimiser step (with gradient accumulation, every micro-batch of a step trains the
    same ones); "largest" and "smallest" are the ends of the space sorted by (width, depth).

    Args:
        space: ``"triangle"`` (BST's 10 pairs) or a list of ``[width, depth]`` pairs.
        sample: how many other submodels each step draws at random (BST: 3).
        include_ends: also train the largest and the smallest submodel every step.
        distill: ``teacher`` (BST), ``inplace`` (the default: needs no teacher) or ``none``.
        teacher: the teacher's checkpoint (``.ckpt``) or run folder (``distill="teacher"``).
        init_from_teacher: load the teacher's weights into the model before training.
        distill_loss: ``bce`` (sigmoid targets, VQA) or ``kl`` (softmax, GQA).
        gt_weight: weight of the task's own loss for the distilled submodels (BST: 0).
        evaluate: which submodels validation and test evaluate.
        logits_fn: ``(pl_module, model_output) -> logits`` for a model whose output holds no
            logits (a classifier outside it); default: the output itself, its first item, or
            its ``.logits``.
        seed, model_attr, patterns, name: see :class:`CompressionCallback`.

    Raises:
        ValueError: for a bad argument (an unknown choice, a teacher path missing with
            ``distill="teacher"``, nothing to learn from with ``distill="none"`` and
            ``gt_weight=0``); at setup, the problems of :meth:`preflight`.

    Example::

        trainer = L.Trainer(callbacks=[SlimmableTraining(distill="teacher",
                                                         teacher="runs/mcan_full")])
    """

    def __init__(
        self,
        space: str | Iterable[Any] = "triangle",
        *,
        sample: int = 3,
        include_ends: bool = True,
        distill: str = "inplace",
        teacher: str | None = None,
        init_from_teacher: bool = True,
        distill_loss: str = "bce",
        gt_weight: float = 0.0,
        evaluate: str = "all",
        logits_fn: Any = None,
        seed: int | None = None,
        model_attr: Any = None,
        patterns: Any = None,
        name: str | None = None,
    ) -> None:
        super().__init__(seed=seed, model_attr=model_attr, patterns=patterns, name=name)
        try:
            self.space = parse_space(space)
        except ValueError as err:
            raise ValueError(f"SlimmableTraining: space: {err}") from None
        self.sample = self.check_argument("sample", sample, int, low=0)
        self.include_ends = bool(include_ends)
        self.distill = self.check_argument("distill", distill, str, choices=DISTILL)
        self.distill_loss = self.check_argument("distill_loss", distill_loss, str, choices=LOSSES)
        self.gt_weight = float(self.check_argument("gt_weight", gt_weight, (int, float), low=0.0))
        self.evaluate = self.check_argument("evaluate", evaluate, str, choices=EVALUATE)
        if distill == "teacher" and not teacher:
            raise ValueError(
                "SlimmableTraining: distill='teacher' needs teacher=<checkpoint or run folder> "
                "(a trained full model); or use distill='inplace'."
            )
        if distill == "none" and self.gt_weight == 0:
            raise ValueError(
                "SlimmableTraining: distill='none' with gt_weight=0 leaves nothing to learn "
                "from; set gt_weight > 0 (e.g. 1.0)."
            )
        if not self.include_ends and self.sample == 0:
            raise ValueError("SlimmableTraining: sample=0 and include_ends=False train nothing.")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(
                "SlimmableTraining: logits_fn must be a function (pl_module, model_output) -> "
                f"logits; got {type(logits_fn).__name__}"
            )
        self.logits_fn = logits_fn
        self.teacher_path = teacher
        self.init_from_teacher = bool(init_from_teacher)
        self.slim: Slimmable | None = None
        self.teacher: nn.Module | None = None
        self._captured: tuple[tuple, dict, Any] | None = None
        self._capture = False
        self._sums: dict[str, list[float]] = {}
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.costs: dict[str, dict[str, int]] = {}
        self.steps = 0
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------ set-up
    def preflight(self, model: nn.Module) -> list[str]:
        """The anatomy's problems; a space with widths below 1 for a model that cannot be
        width-slimmed (no width region, a convolutional patch embedding); a missing
        ``teacher``; a model whose output holds no logits (a Hugging Face base model) without
        ``logits_fn`` when distilling."""
        from vlcompress.compress.slimmable import width_problems

        problems = super().preflight(model)
        anatomy = self.preflight_anatomy(model)
        narrow = sorted({s.width for s in self.space if s.width < 1})
        if anatomy is not None and narrow:
            space = self.advise(lightning="space", vlcompress="options.space")
            problems += [
                f"{space} has widths {[Submodel(w, 1).name.split('-')[0][1:] for w in narrow]}"
                f" below 1, but {p}"
                for p in width_problems(model, anatomy)
            ]
        if self.distill == "teacher" and self.teacher_path:
            from vlcompress.config import ConfigError
            from vlcompress.utils.init_from import resolve_init_path

            try:
                resolve_init_path(self.teacher_path, *self._teacher_words())
            except ConfigError as e:
                problems += list(e.errors)
        if self.distill != "none" and self.logits_fn is None and _returns_hidden_states(model):
            problems.append(
                f"{type(model).__name__} returns hidden states, not logits (its classifier is "
                f"outside it), and distill={self.distill!r} needs every submodel's logits: "
                f"give SlimmableTraining({_LOGITS_FN_EXAMPLE}), or distill='none' with "
                "gt_weight=1"
            )
        return problems

    def _teacher_words(self) -> tuple[str, str]:
        """How messages name ``teacher`` and the fix for a missing one."""
        return (
            self.advise(lightning="teacher", vlcompress="options.teacher"),
            self.advise(
                lightning="train the teacher (the full model) first, or give "
                "SlimmableTraining(teacher=...) an existing run folder or .ckpt file",
                vlcompress="train the teacher (the full model, same model and data) first: "
                "the experiment's seed001_teacher_* companion, e.g. make train "
                "EXP=seed001_teacher_mcan_easy_vqa; or point options.teacher at an existing "
                "run folder or .ckpt file",
            ),
        )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Find the model, attach the slimming, load the teacher, wrap the training step."""
        super().setup(trainer, pl_module, stage)
        root = getattr(trainer, "default_root_dir", None)
        self.run_dir = Path(root) if root else None
        if self.slim is not None:
            return
        if getattr(pl_module, "automatic_optimization", True) is False:
            raise ValueError(
                "SlimmableTraining needs automatic optimisation: it returns the summed loss of "
                "the sampled submodels for one backward and one optimiser step; a "
                "LightningModule that steps its optimisers itself would step once per submodel."
            )
        ddp_kwargs = getattr(getattr(trainer, "strategy", None), "_ddp_kwargs", None)
        every_step_full = self.include_ends and self.space[-1].is_full
        if ddp_kwargs is not None and self.world_size > 1 and not every_step_full:
            if not ddp_kwargs.get("find_unused_parameters"):
                raise ValueError(
                    "SlimmableTraining under DDP: a step without the full model leaves the "
                    "skipped layers' parameters unused, which DDP refuses. Use "
                    "strategy='ddp_find_unused_parameters_true', or include_ends=True with the "
                    "full model [1, 1] in the space."
                )
        if self.distill == "teacher" and self.teacher_path and stage == "fit":
            self.teacher = self._load_teacher(pl_module)
            if self.init_from_teacher:
                self.model.load_state_dict(self.teacher.state_dict())
                log.info("student initialised from the teacher %s", self.teacher_path)
        # the base's effects, undone by its teardown (the model is the full plain model again)
        self.slim = Slimmable(self.model, self.anatomy, pad_outputs=True)
        self.add_effect("slimmable layers", self._detach_slim)
        hook = self.model.register_forward_hook(self._on_forward, with_kwargs=True)
        self.add_effect("forward hook recording the model's call", hook)
        self.wrap_training_step(pl_module, functools.partial(self._sandwich, pl_module))

    def _detach_slim(self) -> None:
        if self.slim is not None:
            self.slim.detach()
            self.slim = None

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Drop the teacher; the base undoes the slimming, the hook and the wrapped step. The
        tables and costs stay for :meth:`report`; the next stage sets up again."""
        self.teacher = None
        super().teardown(trainer, pl_module, stage)

    def _model_prefix(self, pl_module: Any) -> str:
        for name, module in pl_module.named_modules():
            if module is self.model:
                return name
        return ""

    def _load_teacher(self, pl_module: Any) -> nn.Module:
        from vlcompress.utils.init_from import resolve_init_path

        path = resolve_init_path(self.teacher_path, *self._teacher_words())
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        state = ckpt.get("state_dict", ckpt)
        prefix = self._model_prefix(pl_module)
        if prefix:
            state = {
                k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")
            }
        teacher = copy.deepcopy(self.model)
        problems = teacher.load_state_dict(state, strict=False)
        if problems.missing_keys or problems.unexpected_keys:
            raise ValueError(
                f"SlimmableTraining: the teacher {path} does not fit this model: missing "
                f"{problems.missing_keys[:5]}, unexpected {problems.unexpected_keys[:5]}. The "
                "teacher must be the full model of the same architecture (for MCAN: "
                "width_adapters: true in both)."
            )
        teacher.eval().requires_grad_(False)
        log.info("teacher loaded from %s", path)
        return teacher

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._capture:
            self._captured = (args, kwargs, output)

    # ------------------------------------------------------------------ training
    def submodels_at(self, step: int) -> list[Submodel]:
        """The submodels trained at global step ``step``: largest first, then smallest, then
        the random ones (identical on every rank and after a resume)."""
        ends = [self.space[-1], self.space[0]] if self.include_ends else []
        ends = list(dict.fromkeys(ends))
        rest = [s for s in self.space if s not in ends]
        k = min(self.sample, len(rest))
        order = torch.randperm(len(rest), generator=self.generator(step, salt="sandwich"))
        return ends + [rest[i] for i in order[:k].tolist()]

    def _targets(self, pl_module: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.teacher is None:
            raise RuntimeError("SlimmableTraining: no teacher loaded (distill='teacher')")
        device = next(self.model.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            return self._logits_of(pl_module, self.teacher(*args, **kwargs)).detach()

    def _logits_of(self, pl_module: Any, output: Any) -> torch.Tensor:
        """The logits in a model output (``logits_fn`` when given)."""
        if self.logits_fn is not None:
            return self.logits_fn(pl_module, output)
        return _logits(output)

    def _sandwich(self, pl_module: Any, original: Any, *args: Any, **kwargs: Any) -> Any:
        """One step over the sampled submodels. The task's ``training_step`` runs once, for
        the first submodel (the largest; its own logging stays that of one model); the others
        call the model on the same inputs. A submodel's loss is the distillation loss plus
        ``gt_weight`` x the task loss (the task loss of the other submodels then needs the
        task's step again: it runs with its logging switched off)."""
        if self.slim is None:
            raise RuntimeError("SlimmableTraining: the training step ran before setup()")
        step = int(self._trainer.global_step) if self._trainer is not None else self.steps
        subs = self.submodels_at(step)
        total: torch.Tensor | None = None
        targets: torch.Tensor | None = None
        result: Any = None
        m_args: tuple = ()
        m_kwargs: dict = {}
        try:
            for i, sub in enumerate(subs):
                self.slim.set(sub)
                needs_task = (
                    i == 0
                    or self.gt_weight > 0
                    or self.distill == "none"
                    or (self.distill == "inplace" and targets is None)
                )
                task_loss = None
                if needs_task:
                    self._capture, self._captured = True, None
                    with self.quiet_logging(pl_module, quiet=i > 0):
                        out = original(*args, **kwargs)
                    self._capture = False
                    if out is None:
                        raise RuntimeError(
                            "SlimmableTraining: training_step returned None (skipped batch); "
                            "it must return the loss (or a dict with 'loss')."
                        )
                    result = out if i == 0 else result
                    task_loss = out["loss"] if isinstance(out, Mapping) else out
                    if self._captured is None:
                        raise RuntimeError(
                            "SlimmableTraining: training_step did not call the model; the "
                            "callback needs the model's outputs (set model_attr to the module "
                            "the step calls)."
                        )
                    m_args, m_kwargs, output = self._captured
                    self._captured = None
                else:
                    output = self.model(*m_args, **m_kwargs)
                if self.distill == "none":
                    loss = self.gt_weight * task_loss
                else:
                    logits = self._logits_of(pl_module, output)
                    if self.distill == "teacher" and targets is None:
                        targets = self._targets(pl_module, m_args, m_kwargs)
                    if targets is None:  # in-place: the largest learns from the task
                        loss = task_loss
                        if sub == self.space[-1]:
                            targets = logits.detach()
                    else:
                        loss = distillation_loss(logits, targets, self.distill_loss)
                        if self.gt_weight > 0:
                            loss = loss + self.gt_weight * task_loss
                total = loss if total is None else total + loss
        finally:
            self._capture, self._captured = False, None
            self.slim.set(Submodel(1.0, 1.0))
        self.steps += 1
        pl_module.log("slim/train_loss", total.detach(), prog_bar=True, batch_size=_size(args))
        if isinstance(result, Mapping):
            return {**result, "loss": total}
        return total

    # ------------------------------------------------------------------ evaluation
    def _eval_space(self) -> list[Submodel]:
        if self.evaluate == "all":
            return list(self.space)
        if self.evaluate == "ends":
            return list(dict.fromkeys([self.space[0], self.space[-1]]))
        return [Submodel(1.0, 1.0)]

    def _scores(self, pl_module: Any, logits: torch.Tensor, batch: Any) -> torch.Tensor:
        scorer = getattr(pl_module, "example_scores", None)
        if scorer is not None:
            return scorer(logits, batch).float()
        labels = getattr(batch, "targets", None)
        if labels is None and isinstance(batch, Mapping):
            labels = batch.get("labels")
        if labels is None and isinstance(batch, (tuple, list)) and len(batch) >= 2:
            last = batch[-1]  # (inputs, labels)
            if isinstance(last, torch.Tensor) and len(last) == len(logits):
                labels = last
        if labels is None:
            raise ValueError(
                "SlimmableTraining: cannot score the submodels: give the LightningModule an "
                "example_scores(logits, batch) method, or batches with targets / labels (or "
                "(inputs, labels) tuples)."
            )
        if labels.dim() == logits.dim():
            labels = labels.argmax(dim=-1)
        return (logits.argmax(dim=-1) == labels).float()

    def _eval_start(self) -> None:
        self._sums = {s.key: [0.0, 0.0] for s in self._eval_space()}
        self._capture = True

    def _eval_batch(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        if self._captured is None or self.slim is None:
            return
        args, kwargs, output = self._captured
        self._captured = None
        if getattr(trainer, "sanity_checking", False):
            return
        self._capture = False
        plugin = getattr(trainer, "precision_plugin", None)
        context = getattr(plugin, "forward_context", None)
        try:
            if not self.costs:
                self._count_costs(args, kwargs)
            with torch.no_grad(), context() if context else contextlib.nullcontext():
                for sub in self._eval_space():
                    if sub.is_full:
                        logits = self._logits_of(pl_module, output)
                    else:
                        with self.slim.submodel(sub):
                            logits = self._logits_of(pl_module, self.model(*args, **kwargs))
                    scores = self._scores(pl_module, logits, batch)
                    acc = self._sums[sub.key]
                    acc[0] += float(scores.sum())
                    acc[1] += float(scores.numel())
        finally:
            self._capture = True

    def _eval_end(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._capture, self._captured = False, None
        if not self._sums or getattr(trainer, "sanity_checking", False):
            self._sums = {}
            return
        keys = list(self._sums)
        sums = torch.tensor([self._sums[k] for k in keys], dtype=torch.float64)
        reduce = getattr(getattr(trainer, "strategy", None), "reduce", None)
        if reduce is not None and self.world_size > 1:
            sums = reduce(sums.to(pl_module.device), reduce_op="sum").cpu()
        rows = []
        for sub, (total, count) in zip(self._eval_space(), sums.tolist()):
            acc = total / count if count else float("nan")
            pl_module.log(f"slim/{sub.key}/{stage}_acc", acc, sync_dist=False)
            rows.append({"submodel": sub.name, "width": sub.width, "depth": sub.depth,
                         "accuracy": acc, "examples": int(count), **self.costs.get(sub.key, {})})  # fmt: skip
        self.tables[stage] = rows
        self._sums = {}
        if stage == "test" and self.is_global_zero and self.run_dir is not None:
            from vlcompress.utils.plots import plot_submodels

            report = getattr(getattr(trainer, "datamodule", None), "split_report", None) or {}
            prior = report.get("prior_baseline") if isinstance(report, dict) else None
            reference = {} if prior is None else {"blind: the commonest answer per type": prior}
            plot_submodels(rows, self.run_dir / "slimmable.png", reference=reference)

    def _count_costs(self, args: tuple, kwargs: dict) -> None:
        """Parameters, MACs and FLOPs of every submodel's exported copy, counted on the CPU
        (where every attention product is seen; the GPU kernels are not all counted)."""
        from lightning.fabric.utilities.apply_func import move_data_to_device

        from vlcompress.utils.flops import count_compute

        if self.slim is None:
            return
        one_args, one_kwargs = _one_example(args), _one_example(kwargs)
        cpu = torch.device("cpu")
        cpu_args, cpu_kwargs = move_data_to_device((one_args, one_kwargs), cpu)
        for sub in self.space:
            small = self.slim.export(sub, *one_args, **one_kwargs).to(cpu)
            compute = count_compute(small, *cpu_args, **cpu_kwargs)
            self.costs[sub.key] = {
                "parameters": sum(p.numel() for p in small.parameters()),
                "macs": compute.macs,
                "flops": compute.flops,
            }
            del small

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the per-submodel sums."""
        self._eval_start()

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        """Evaluate the other submodels on the batch the task just evaluated."""
        self._eval_batch(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Log every submodel's validation accuracy."""
        self._eval_end(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start the per-submodel sums."""
        self._eval_start()

    def on_test_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        """Evaluate the other submodels on the batch the task just tested."""
        self._eval_batch(trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        """Log every submodel's test accuracy, plot accuracy against MACs."""
        self._eval_end(trainer, pl_module, "test")

    # ------------------------------------------------------------------ state and report
    def state(self) -> dict[str, Any]:
        """Steps taken and the last evaluation tables (the sampling itself is a function of
        the seed and the step)."""
        return {"steps": self.steps, "tables": self.tables}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue a resumed run."""
        self.steps = int(state.get("steps", 0))
        self.tables = dict(state.get("tables") or {})

    def report(self) -> dict[str, Any]:
        """The space, the training set-up and the per-submodel tables."""
        return {
            "space": [s.name for s in self.space],
            "distill": self.distill,
            "teacher": self.teacher_path,
            "sandwich": {"include_ends": self.include_ends, "sample": self.sample},
            "steps": self.steps,
            **{f"{stage}_submodels": rows for stage, rows in self.tables.items()},
        }

    def report_rows(self) -> list[tuple[str, str]]:
        """One row per tested submodel: accuracy, parameters, MACs."""
        out = []
        for r in self.tables.get("test", []):
            cost = ""
            if "parameters" in r:
                cost = f" ({r['parameters'] / 1e6:.2f} M params, {r['macs'] / 1e6:.1f} M MACs)"
            out.append((f"test acc {r['submodel']}", f"{r['accuracy']:.4f}{cost}"))
        return out


def _size(args: tuple) -> int | None:
    batch = args[0] if args else None
    try:
        return len(batch)  # type: ignore[arg-type]
    except TypeError:
        return None
