"""Pipeline stages: start a run from an earlier run's model weights (``init_from``).

``init_from: <run folder or .ckpt file>`` (or ``backbone:<name>``, a pretrained backbone of
``experiments/backbones/``, see :mod:`vlcompress.backbones`) makes a new run start from that checkpoint's *model*
weights, with a fresh optimiser, scheduler and step counter (a new stage, not a resume):

* A run folder resolves to the checkpoint whose test accuracy the folder reports: the one its
  ``results.json`` names as ``best_checkpoint`` (``checkpoints/best.ckpt``, best validation
  accuracy), looked up inside the folder; a folder without ``results.json`` (an unfinished run)
  resolves to ``checkpoints/last.ckpt``, with a warning. A ``.ckpt`` path is used as it is.
* Before anything is loaded, the checkpoint's stored configuration must name the same model
  with the same options (defaults filled in), and its answer list must equal this run's (same
  answers in the same order); every parameter must have the same shape. Each mismatch is named
  with the fix.
* The loss's own parameters (LMH's gate, RUBi's question-only branch) are loaded only when the
  previous stage used the same loss with the same options; otherwise they start fresh.
* Callback state stored in the checkpoint (``checkpoint["callbacks"]``, e.g. a pruning
  callback's masks) is not applied. The checkpoint (without optimiser states) is kept on the
  task as ``pl_module.init_checkpoint`` so a callback can take it up in ``setup``.
* ``init_grow: true`` (depth growth) lets the checkpoint be a *shallower* model of the same
  kind: the depth options (:data:`GROWABLE_DEPTHS`: ``num_layers``, ``language_layers``,
  ``vision_layers``, ``cross_layers``) may be larger in this run (and ``zero_init_residual``
  may differ); every other option must match. The checkpoint's ``k``
  layers of each layer stack (an ``nn.ModuleList``) go where a depth-``k`` submodel of this
  model keeps its layers (the anatomy's depth priority, in index order: BST's MCAN keeps
  encoder layer 0 and decoder layer 5 at depth 1, and any stack without a declared order keeps
  layers 0 and L-1 at depth 2; a list the anatomy does not know: the first ``k``),
  so the shallower model becomes the grown one's depth-``k`` submodel. The other layers keep
  their fresh initialisation (with ``zero_init_residual`` they start close to the identity) and
  every other tensor is loaded as usual. The loaded record says which stacks grew, and into
  which layers.
* A resumed run (``resume=true`` or a Slurm requeue) continues from its own ``last.ckpt``:
  resume wins over ``init_from``, whose weights the run already started from.

Example::

    # stage 1: fine-tune with LPF; stage 2: start from it with LMH
    python -m vlcompress train easy_vqa_cp loss.name=lpf output_dir=runs/stage1
    python -m vlcompress train easy_vqa_cp loss.name=lmh init_from=runs/stage1
    # grow a trained 1-layer MCAN into 6 + 6 layers
    python -m vlcompress train default model.options.num_layers=6 \
        model.options.zero_init_residual=true init_from=runs/mcan1 init_grow=true
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlcompress import registry
from vlcompress.config import ConfigError

BACKBONE_PREFIX = "backbone:"
"""``init_from: backbone:<name>`` names a pretrained backbone (:mod:`vlcompress.backbones`)."""

__all__ = [
    "GROWABLE_DEPTHS",
    "InitRecord",
    "apply_init_checkpoint",
    "load_init_checkpoint",
    "resolve_init_path",
]

log = logging.getLogger(__name__)

_DROPPED = ("optimizer_states", "lr_schedulers")
"""Checkpoint entries not kept in ``init_checkpoint`` (large and never used by a new stage)."""


@dataclass
class InitRecord:
    """What a run started from (written to ``results.json`` and ``run.json``).

    Attributes:
        path: the resolved checkpoint file.
        sha256: its SHA-256 (hex).
        loaded: which parts were loaded (``model``, and ``loss`` when the loss matched).
    """

    path: str
    sha256: str
    loaded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The record as plain types."""
        return dataclasses.asdict(self)


def resolve_init_path(
    init_from: str | Path, what: str = "init_from", fix: str | None = None
) -> Path:
    """The checkpoint file that ``init_from`` names (see the module docstring).

    Args:
        init_from: a run folder, a ``.ckpt`` file, or ``backbone:<name>`` (a finished
            backbone's folder, see :mod:`vlcompress.backbones`).
        what: the option that gave the path, for messages (``"init_from"``; a callback's
            ``"teacher"`` or ``"masks_from"``).
        fix: what to do about a missing path, for messages (default: give the run folder of
            the previous stage or a ``.ckpt`` file).

    Raises:
        ConfigError: the path does not exist, or a run folder holds no checkpoint.
    """
    if str(init_from).startswith(BACKBONE_PREFIX):
        from vlcompress.backbones import resolve_backbone

        init_from = resolve_backbone(str(init_from), what)
    path = Path(init_from)
    if path.is_file():
        return path
    if not path.exists():
        fix = (
            fix
            or "give the run folder of the previous stage (holding checkpoints/) or a .ckpt file"
        )
        raise ConfigError([f"{what}: {path} does not exist; {fix}"])
    results = path / "results.json"
    if results.is_file():
        try:
            best = json.loads(results.read_text()).get("best_checkpoint") or ""
        except (OSError, ValueError):
            best = ""
        if best and (path / "checkpoints" / Path(best).name).is_file():
            return path / "checkpoints" / Path(best).name
    last = path / "checkpoints" / "last.ckpt"
    if last.is_file():
        if not results.is_file():
            log.warning(
                "%s: %s has no results.json (an unfinished run?); starting from %s",
                what,
                path,
                last,
            )
        return last
    fix = fix or "give a finished run folder of the previous stage or a .ckpt file"
    raise ConfigError(
        [f"{what}: the folder {path} holds no checkpoints/last.ckpt or best.ckpt; {fix}"]
    )


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_init_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint for ``init_from`` on the CPU, without its optimiser states.

    Raises:
        ConfigError: the file cannot be read as a checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError(
            [f"init_from: cannot read the checkpoint {path} ({type(e).__name__}: {e})"]
        ) from e
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError([f"init_from: {path} is not a Lightning checkpoint (no state_dict)"])
    return {k: v for k, v in state.items() if k not in _DROPPED}


def _filled_options(kind: str, name: str, options: Any) -> dict[str, Any] | None:
    try:
        return dataclasses.asdict(registry.get(kind, name).make_options(options or {}))
    except (registry.UnknownComponentError, TypeError, ValueError):
        return None  # not comparable here; the shape check still guards the weights


GROWABLE_DEPTHS = ("num_layers", "language_layers", "vision_layers", "cross_layers")
"""Model options that size a layer stack (an ``nn.ModuleList``): ``init_grow`` lets them grow."""

_GROWABLE = ("zero_init_residual",)
"""Model options besides the depths that may differ under ``init_grow``."""


def _growable(key: str, old: Any, new: Any) -> bool:
    """Whether option ``key`` may go from ``old`` to ``new`` under ``init_grow``."""
    if key in _GROWABLE:
        return True
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (old, new))
    return key in GROWABLE_DEPTHS and ints and new >= old


def _component_problems(
    section: str, kind: str, stored: Any, new: dict[str, Any], grow: bool = False
) -> list[str]:
    """How the checkpoint's ``section`` differs from this run's (empty: the same); with
    ``grow``, deeper layer stacks (see :func:`_growable`) are not a difference."""
    if not isinstance(stored, dict):
        return []
    if stored.get("name") != new["name"]:
        return [
            f"{section}.name: the checkpoint's is {stored.get('name')!r}, this run's {new['name']!r}"
        ]
    old = _filled_options(kind, stored["name"], stored.get("options"))
    cur = _filled_options(kind, new["name"], new.get("options"))
    if old is None or cur is None:
        return []
    return [
        f"{section}.options.{k}: the checkpoint's is {old.get(k)!r}, this run's {cur.get(k)!r}"
        for k in sorted(set(old) | set(cur))
        if old.get(k) != cur.get(k) and not (grow and _growable(k, old.get(k), cur.get(k)))
    ]


def _sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@dataclass
class _Growth:
    """One layer stack that grows: the checkpoint's ``old`` layers go to ``targets``."""

    old: int
    new: int
    targets: tuple[int, ...]


def _layer_of(key: str, path: str) -> int | None:
    """The index ``i`` when ``key`` is ``<path>.<i>.<rest>``, else ``None``."""
    head = key[len(path) + 1 :].split(".", 1)[0] if key.startswith(path + ".") else ""
    return int(head) if head.isdigit() else None


def _stack_targets(model: nn.Module, anatomy: Any, path: str, old: int) -> tuple[int, ...]:
    """Where ``old`` layers of the stack at ``path`` go: the layers a depth-``old`` submodel
    keeps (the anatomy's depth priority, in index order), else the first ``old``."""
    for stack, names in (anatomy.stacks if anatomy is not None else {}).items():
        if names and all(n == f"{path}.{i}" for i, n in enumerate(names)):
            if len(names) != len(model.get_submodule(path)):
                break  # the anatomy lists part of the list only: keep the plain order
            return tuple(sorted(anatomy.depth_priority(stack)[:old]))
    return tuple(range(old))


def _grown_layers(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, _Growth]:
    """The layer stacks (``nn.ModuleList``) of ``model`` deeper than the checkpoint's; a
    stack's depth in the checkpoint is one more than its highest ``<path>.<i>.`` index. A list
    whose extra entries hold no tensors (parameter-free modules) has not grown."""
    own = list(model.state_dict())
    anatomy = model.anatomy() if callable(getattr(model, "anatomy", None)) else None
    grown = {}
    for path, sub in model.named_modules():
        if not isinstance(sub, nn.ModuleList) or not path:
            continue
        idx = [i for k in state if (i := _layer_of(k, path)) is not None]
        old = max(idx) + 1 if idx else 0
        deeper = any((i := _layer_of(k, path)) is not None and i >= old for k in own)
        if 0 < old < len(sub) and deeper:
            grown[path] = _Growth(old, len(sub), _stack_targets(model, anatomy, path, old))
    return grown


def _grow_state(
    state: dict[str, torch.Tensor], grown: dict[str, _Growth]
) -> dict[str, torch.Tensor]:
    """``state`` with each grown stack's layer ``j`` renamed to its target layer."""
    out = {}
    for k, v in state.items():
        for path, g in grown.items():
            j = _layer_of(k, path)
            if j is not None:
                k = f"{path}.{g.targets[j]}.{k[len(path) + 1 :].partition('.')[2]}"
                break
        out[k] = v
    return out


def _in_fresh_layer(key: str, grown: dict[str, _Growth]) -> bool:
    return any(
        (i := _layer_of(key, path)) is not None and i not in g.targets for path, g in grown.items()
    )


def _shape_problems(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    grown: dict[str, _Growth] | None = None,
) -> list[str]:
    own = module.state_dict()
    if grown:
        own = {k: v for k, v in own.items() if not _in_fresh_layer(k, grown)}
    problems = [
        f"{what}.{k}: the checkpoint's shape is {list(state[k].shape)}, this run's {list(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing:
        problems.append(f"{what}: the checkpoint lacks {len(missing)} tensor(s): {missing[:5]}")
    if extra:
        problems.append(
            f"{what}: the checkpoint has {len(extra)} tensor(s) this run's model lacks: {extra[:5]}"
        )
    return problems


def apply_init_checkpoint(
    task: Any, config: dict[str, Any], init_from: str | Path, grow: bool = False
) -> InitRecord:
    """Load the previous stage's weights into ``task`` (a :class:`~vlcompress.tasks.VQATask`
    with ``model`` and ``loss_fn``) and keep the checkpoint as ``task.init_checkpoint``.

    Args:
        task: the freshly built task of this run.
        config: this run's resolved configuration (plain types).
        init_from: a run folder or a ``.ckpt`` file (see :func:`resolve_init_path`).
        grow: depth growth (``init_grow``): the checkpoint may hold fewer layers per stack.

    Returns:
        What was loaded from where (:class:`InitRecord`).

    Raises:
        ConfigError: a missing or unreadable checkpoint, or one of another model, other
            options, other answers or other parameter shapes; every mismatch is listed.
    """
    path = resolve_init_path(init_from)
    ckpt = load_init_checkpoint(path)
    stored = ckpt.get("vlcompress_config") or {}
    problems = _component_problems(
        "model", "model", stored.get("model"), config["model"], grow=grow
    )
    answers = ckpt.get("vlcompress_answers")
    if answers is not None and list(answers) != list(task.answers):
        a, b = list(answers), list(task.answers)
        detail = (
            f"{len(a)} answers vs this run's {len(b)}"
            if len(a) != len(b)
            else "the same number of answers in another order or with other names, first "
            f"difference at {next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)}"
        )
        problems.append(f"answers: the checkpoint predicts {detail}")
    state = ckpt["state_dict"]
    model_state = _sub_state(state, "model.")
    grown = _grown_layers(task.model, model_state) if grow else {}
    model_state = _grow_state(model_state, grown)
    if not problems:
        problems = _shape_problems(task.model, model_state, "model", grown)
    if problems:
        raise ConfigError(
            [f"init_from {path}: {p}" for p in problems]
            + [
                "a stage starts from a checkpoint of the same model on the same answers: use "
                "the previous stage's model / data settings, or another init_from="
                + (" (init_grow=true lets only the *layers depths grow)" if grow else "")
            ]
        )
    # growing: _shape_problems checked that exactly the fresh layers' tensors are missing
    task.model.load_state_dict(model_state, strict=not grown)
    if grown:  # callbacks reading the checkpoint (masks_from=init) see the grown names
        state = {k: v for k, v in state.items() if not k.startswith("model.")}
        state.update({f"model.{k}": v for k, v in model_state.items()})
        ckpt = {**ckpt, "state_dict": state}
    loaded = ["model"]
    if grow and not grown:
        log.warning("init_grow: the checkpoint is as deep as this run's model; nothing grew")
    loaded += [
        f"grown {stack} {g.old}->{g.new} (into layers {list(g.targets)})"
        for stack, g in sorted(grown.items())
    ]
    same_loss = not _component_problems("loss", "loss", stored.get("loss"), config["loss"])
    loss_state = _sub_state(state, "loss_fn.")
    if same_loss and stored.get("loss") and loss_state:
        task.loss_fn.load_state_dict(loss_state)
        loaded.append("loss")
    elif loss_state:
        log.info(
            "init_from: the loss differs from the previous stage's; its parameters start fresh"
        )
    task.init_checkpoint = ckpt
    record = InitRecord(str(path.resolve()), _sha256(path), loaded)
    log.info("init_from: started from %s (%s)", record.path, ", ".join(loaded))
    return record
