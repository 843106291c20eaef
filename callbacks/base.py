"""``CompressionCallback``: the base of every vlcompress callback (pruning, slimming, skipping,
distillation, guards).

It does the work every compression method needs and none should repeat:

* finds the model's :class:`~vlcompress.models.anatomy.Anatomy` in :meth:`setup` (our models,
  recognised Hugging Face / timm models, or user-given ``AnatomyPatterns``);
* keeps the callback's state in the checkpoint (:meth:`state` / :meth:`load_state`, under a
  :attr:`state_key` that two instances can share a checkpoint with), loadable with
  ``torch.load(weights_only=True)``;
* makes random and data-dependent decisions identical on every DDP rank (:meth:`decide`,
  :meth:`broadcast`, :meth:`generator`);
* reports into ``results.json`` and the results table (:meth:`report`, :meth:`report_rows`);
* runs under ``lightning.pytorch.Trainer`` and ``pytorch_lightning.Trainer`` alike.

Both Lightning packages
    Lightning ships the same Trainer twice: ``lightning.pytorch`` and the standalone
    ``pytorch_lightning``. Both call callback hooks by name (duck typing), and the hooks here use
    only what both trainers provide (``trainer.strategy``, ``trainer.global_step``, ...). A few
    places do check ``isinstance(cb, Callback)`` against their own package's class, e.g.
    ``Trainer(callbacks=cb)`` with a single callback (not a list) fails with "object is not
    iterable", and ``LightningCLI`` types ``trainer.callbacks`` with its own package's
    ``Callback`` when it resolves a ``class_path``. So the base derives from the ``Callback``
    class of *each installed package*, resolved once at import (:data:`CALLBACK_BASES`):
    ``class CompressionCallback(lightning.pytorch.Callback, pytorch_lightning.Callback)`` when
    both are installed (importing ``pytorch_lightning`` after ``lightning`` costs ~0.1 s). The
    two classes are plain no-op hook tables with the same method names, so the MRO is
    unambiguous and every ``isinstance`` check in either package passes. A LightningModule must
    still match its Trainer's package (that check is Lightning's, on the user's module).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlcompress.callbacks.effects import Effects, quiet_logging, wrap_training_step

if TYPE_CHECKING:
    from vlcompress.models.anatomy import Anatomy, AnatomyPatterns

log = logging.getLogger(__name__)

__all__ = [
    "CALLBACK_BASES",
    "STATE_FORMAT",
    "CompressionCallback",
    "collect_report_rows",
    "collect_reports",
]

STATE_FORMAT = 1
"""Version of the layout :meth:`CompressionCallback.state_dict` writes."""

_SEED_LIMIT = 2**63


def _import_callback_class(package: str) -> type:
    """``<package>.Callback``, imported without taking over Lightning's log routing.

    Both Lightning packages point ``lightning_utilities``' shared rank-zero logger at their own
    logger when imported, the last import winning. Importing the second package here would
    silently re-route every Lightning message of the user's project (and a vlcompress run's
    ``run.log``), so the logger that was in place is kept whenever a package had set one. When
    neither was imported before ``vlcompress.callbacks``, ``lightning.pytorch``'s logger stays:
    a project using only ``pytorch_lightning`` that imports our callbacks first then finds
    Lightning's rank-zero messages under the ``lightning.pytorch`` logger (still printed).
    """
    import importlib

    from lightning_utilities.core import rank_zero

    before = rank_zero.log
    module = importlib.import_module(package)
    if before.name != rank_zero.__name__:  # a Lightning package was imported first: keep it
        rank_zero.log = before
    return module.Callback


def _callback_bases() -> tuple[type, ...]:
    """The ``Callback`` class of each installed Lightning package (``lightning.pytorch`` first)."""
    bases: list[type] = []
    try:
        bases.append(_import_callback_class("lightning.pytorch"))
    except ImportError:  # a project with only pytorch_lightning installed
        pass
    try:
        bases.append(_import_callback_class("pytorch_lightning"))
    except ImportError:
        pass
    except Exception as e:  # a broken optional install must not break lightning.pytorch users
        log.warning("pytorch_lightning is installed but cannot be imported (%s); "
                    "vlcompress callbacks work with lightning.pytorch only", e)  # fmt: skip
    if not bases:
        raise ImportError(
            "vlcompress callbacks need Lightning: pip install 'lightning>=2.4' "
            "(or 'pytorch-lightning>=2.4')"
        )
    return tuple(bases)


CALLBACK_BASES: tuple[type, ...] = _callback_bases()
"""Base classes of :class:`CompressionCallback`: ``lightning.pytorch.Callback`` and, when
installed, ``pytorch_lightning.Callback``."""


class _DecisionFailed(RuntimeError):
    """Sent from rank 0 to the other ranks when the function given to ``decide`` raised."""


def _check_weights_only(obj: Any, path: str) -> None:
    """Raise ``TypeError`` naming the first value under ``obj`` that
    ``torch.load(weights_only=True)`` could not load."""
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{path}[{i}]")
        return
    if type(obj) is dict:
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(
                    f"{path}: key {k!r} of type {type(k).__name__} cannot be loaded with "
                    "torch.load(weights_only=True); use str or int keys (e.g. Modality.value)"
                )
            _check_weights_only(v, f"{path}[{k!r}]")
        return
    raise TypeError(
        f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}, which "
        "torch.load(weights_only=True) cannot load; keep callback state to tensors, "
        "None/bool/int/float/str, and lists/tuples/dicts of them (an Enum -> its .value, "
        "a numpy array -> torch.from_numpy, a dataclass -> dataclasses.asdict)"
    )


class CompressionCallback(*CALLBACK_BASES):
    """Base of the vlcompress callbacks: anatomy, checkpointed state, DDP-identical decisions,
    reports, and both Lightning packages.

    A subclass implements its method in the usual Lightning hooks and relies on the base for
    the rest:

    * **arguments** — its ``__init__`` checks its own arguments (``ValueError`` / ``TypeError``
      naming the argument, what is allowed and what was given; :meth:`check_argument` does the
      common cases) and calls ``super().__init__(...)`` with the base arguments it exposes.
      ``__init__`` must stay cheap: the vlcompress registry validates an experiment by building
      its callbacks.
    * **anatomy** — after ``super().setup(trainer, pl_module, stage)``, :attr:`model` is the
      module being compressed and :attr:`anatomy` its declared structure. Set the class
      attribute ``requires_anatomy = False`` for a callback that needs none.
    * **state** — override :meth:`state` (return everything a resumed run needs: masks,
      schedules, counters) and :meth:`load_state` (take it back, and re-apply any effect on the
      model). The base wraps it with its own state (the resolved seed) in :meth:`state_dict`.
      ``load_state`` runs after ``setup`` (so :attr:`anatomy` is there) and before
      ``on_fit_start`` with the default strategies.
    * **decisions** — anything random or data-dependent goes through :meth:`decide` (rank 0
      computes, every rank gets the result) or uses :meth:`generator` (seeded from the
      callback's seed and the step, so it draws the same numbers on every rank and again on
      resume). Both are collective: call them on every rank at the same point.
    * **reports** — override :meth:`report` (a JSON-serialisable dict; it becomes
      ``results["callbacks"][state_key]`` in a vlcompress run) and :meth:`report_rows`
      (``(metric, value)`` rows for the results table).
    * **messages** — :meth:`advise` picks advice for a plain Lightning project or, when the
      vlcompress run sets :attr:`within_vlcompress_run`, advice in terms of our config keys.
    * **changing training** — one mechanism, set up through the base and undone by its
      :meth:`teardown` (so after ``fit`` the user's module is exactly what it was: no hook,
      no instance attribute, the same ``state_dict`` keys; the ledger is
      :class:`~vlcompress.callbacks.effects.Effects`):

      - *the training step*: :meth:`wrap_training_step` (an extra loss term, several forwards
        per step); :meth:`quiet_logging` for a step run twice;
      - *owned parameters*: :meth:`own_module` (adapters, projection heads) and
        :meth:`owned_parameters` (bare tensors such as mask scores) are trained by the
        callback's own optimiser (:meth:`configure_owned_optimizer`), built in
        ``on_fit_start`` and stepped right before the model's optimiser, with gradients
        averaged over DDP ranks; modules, tensors and optimiser state are in the checkpoint;
      - *modules on the model*: :meth:`attach_module` passes a read-out's output through an
        owned module (the anatomy's :meth:`~vlcompress.models.anatomy.Anatomy.attach`);
      - *hidden states*: :meth:`capture_hidden` (the anatomy's read-outs, every forward);
      - *anything else undoable* (the anatomy's masks, a ``Slimmable``): :meth:`add_effect`.

      Make effects in :meth:`setup` (every stage; the base undid the last stage's); a
      subclass that overrides ``on_fit_start``, ``on_before_optimizer_step`` or ``teardown``
      calls ``super()``.

    Resume rule
        Lightning restores, in this order: the model's weights (``state_dict`` keys must
        match), then every callback's :meth:`load_state_dict`, then the model's optimisers and
        loops, then calls ``on_fit_start``. So a callback **never adds parameters or buffers to
        the user's module** (that changes its ``state_dict`` keys and breaks the model's
        restore): it owns them and attaches them with hooks. It creates its owned modules in
        :meth:`setup`, which runs before :meth:`load_state_dict` (their weights are loaded
        then; a module owned later gets its checkpointed weights when it is owned); the owned
        optimiser is built in ``on_fit_start`` and gets its checkpointed state there. Done
        this way a killed and resumed run ends bit-identical to an uninterrupted one
        (``tests/callbacks/test_owned_resume.py``, both Lightning packages, 1 and 2
        processes).

    Args:
        seed: seed of the callback's random decisions. ``None``: rank 0 takes
            ``torch.initial_seed()`` (so ``seed_everything`` makes runs reproducible) and
            broadcasts it. Saved in the checkpoint: a resumed run keeps its seed.
        model_attr: which module to compress. ``None``: the LightningModule's ``model``
            attribute if it is an ``nn.Module``, else the LightningModule itself. A dotted
            attribute path (``"backbone.encoder"``) or a callable ``pl_module -> nn.Module``
            chooses another one (a module-level function, not a lambda, under ``ddp_spawn``,
            which pickles the callbacks).
        patterns: ``AnatomyPatterns`` describing a model that declares no anatomy and is not
            recognised automatically (see ``vlcompress.models.anatomy.BERT_PATTERNS``).
        name: distinguishes two instances of one class in a checkpoint and in the results;
            the state key is ``ClassName`` or ``ClassName[name]``.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: an argument out of range.

    Example::

        class RandomHeadDropper(CompressionCallback):
            def __init__(self, fraction: float = 0.25, seed: int | None = None) -> None:
                super().__init__(seed=seed)
                self.fraction = self.check_argument("fraction", fraction, float, low=0.0, high=1.0)
                self.dropped: list[str] = []

            def on_train_start(self, trainer, pl_module):
                def pick():
                    heads = [f"{a.name}:{h}" for a in self.anatomy.attentions
                             for h in range(a.num_heads)]
                    order = torch.randperm(len(heads), generator=self.generator())
                    return [heads[i] for i in order[: int(self.fraction * len(heads))]]

                self.dropped = self.decide(pick)

            def state(self):
                return {"dropped": list(self.dropped)}

            def load_state(self, state):
                self.dropped = list(state["dropped"])

            def report(self):
                return {"dropped_heads": len(self.dropped)}

        trainer = L.Trainer(callbacks=[RandomHeadDropper(fraction=0.5, seed=0)])
    """

    requires_anatomy: ClassVar[bool] = True
    """Whether :meth:`setup` finds the anatomy (``False`` for callbacks that need none)."""

    within_vlcompress_run: bool = False
    """Set to ``True`` by ``vlcompress.run`` so that messages name our config keys
    (``optim.lr``) instead of Lightning arguments (``Trainer(gradient_clip_val=...)``)."""

    resuming_run: bool = False
    """Set to ``True`` by ``vlcompress.preflight`` when the run continues its own checkpoint:
    :meth:`preflight` then skips inputs that only a fresh start reads (the checkpoint holds
    what came of them, e.g. ``MagnitudePruning``'s masks from ``masks_from``)."""

    def __init__(
        self,
        *,
        seed: int | None = None,
        model_attr: str | Callable[[Any], nn.Module] | None = None,
        patterns: AnatomyPatterns | None = None,
        name: str | None = None,
    ) -> None:
        if seed is not None:
            self.check_argument("seed", seed, int, low=0, high=_SEED_LIMIT - 1)
        if model_attr is not None and not callable(model_attr):
            if not isinstance(model_attr, str):
                raise TypeError(
                    f"{type(self).__name__}: model_attr must be None, a dotted attribute path "
                    f"(str) or a callable pl_module -> nn.Module; got {type(model_attr).__name__}"
                )
            if not all(part.isidentifier() for part in model_attr.split(".")):
                raise ValueError(
                    f"{type(self).__name__}: model_attr must be a dotted attribute path such as "
                    f"'model' or 'backbone.encoder'; got {model_attr!r}"
                )
        if patterns is not None:
            from vlcompress.models.anatomy import AnatomyPatterns

            if not isinstance(patterns, AnatomyPatterns):
                raise TypeError(
                    f"{type(self).__name__}: patterns must be None or "
                    "vlcompress.models.anatomy.AnatomyPatterns; got "
                    f"{type(patterns).__name__}"
                )
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise ValueError(
                f"{type(self).__name__}: name must be None or a non-empty str; got {name!r}"
            )
        self._seed_arg = seed
        self._seed: int | None = seed
        self.model_attr = model_attr
        self.patterns = patterns
        self.name = name.strip() if name is not None else None
        self._trainer: Any = None
        self._model: nn.Module | None = None
        self._anatomy: Anatomy | None = None
        self.effects = Effects(self.state_key)
        self.owned = nn.ModuleDict()
        self._owned_opt: torch.optim.Optimizer | None = None
        self._owned_opt_state: dict[str, Any] | None = None
        self._owned_pending: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ arguments
    def check_argument(
        self,
        arg: str,
        value: Any,
        kind: type | tuple[type, ...],
        *,
        low: float | None = None,
        high: float | None = None,
        choices: Iterable[Any] | None = None,
    ) -> Any:
        """Check one ``__init__`` argument and return it (an ``int`` given for a ``float``
        comes back as a ``float``).

        Args:
            arg: the argument's name (for the message).
            value: what was given.
            kind: the allowed type(s); ``bool`` is never accepted as a number.
            low, high: inclusive bounds.
            choices: the allowed values.

        Raises:
            TypeError: ``value`` is not of ``kind``.
            ValueError: ``value`` is out of ``[low, high]``, not finite, or not in ``choices``.
        """
        kinds = kind if isinstance(kind, tuple) else (kind,)
        numeric = any(k in (int, float) for k in kinds)
        ok = isinstance(value, kinds) or (float in kinds and isinstance(value, int))
        if not ok or (numeric and bool not in kinds and isinstance(value, bool)):
            allowed = " or ".join(k.__name__ for k in kinds)
            raise TypeError(
                f"{type(self).__name__}: {arg} must be {allowed}; got {value!r} "
                f"({type(value).__name__})"
            )
        cls = type(self).__name__
        if choices is not None:
            choices = list(choices)
            if value not in choices:
                raise ValueError(f"{cls}: {arg} must be one of {choices}; got {value!r}")
        if numeric and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{cls}: {arg} must be finite; got {value!r}")
            if (low is not None and value < low) or (high is not None and value > high):
                lo = "-inf" if low is None else low
                hi = "inf" if high is None else high
                raise ValueError(f"{cls}: {arg} must be in [{lo}, {hi}]; got {value!r}")
            if float in kinds and int not in kinds:
                value = float(value)
        return value

    # ------------------------------------------------------------------ identity
    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint's ``callbacks`` section and of its
        report in ``results["callbacks"]``: ``ClassName`` or ``ClassName[name]``."""
        cls = type(self).__qualname__
        return f"{cls}[{self.name}]" if self.name else cls

    # ------------------------------------------------------------------ ranks
    @property
    def global_rank(self) -> int:
        """This process's rank (0 outside a Trainer)."""
        return int(getattr(self._trainer, "global_rank", 0))

    @property
    def world_size(self) -> int:
        """Number of processes (1 outside a Trainer)."""
        return int(getattr(self._trainer, "world_size", 1))

    @property
    def is_global_zero(self) -> bool:
        """True on the process that decides (rank 0) and outside a Trainer."""
        return self.global_rank == 0

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank (``trainer.strategy.broadcast``).

        Collective: every rank must call it at the same point. Outside a Trainer (or on one
        process) it returns ``obj``.
        """
        if self._trainer is None or self.world_size == 1:
            return obj
        return self._trainer.strategy.broadcast(obj, src=src)

    def decide(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on rank 0 only and return its result on every rank.

        Use it for every random or data-dependent choice (which heads to drop, a pruning
        threshold computed from local weights or statistics): the ranks then act on the same
        decision even when their own data, generators or statistics differ. If ``fn`` raises
        on rank 0, rank 0 re-raises it and the other ranks raise ``RuntimeError`` naming it
        (instead of waiting forever). Collective, like :meth:`broadcast`.
        """
        if self._trainer is None or self.world_size == 1:
            return fn(*args, **kwargs)
        error: BaseException | None = None
        result: Any = None
        if self.is_global_zero:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:
                error = e
                result = _DecisionFailed(f"{type(e).__name__}: {e}")
        result = self.broadcast(result)
        if error is not None:
            raise error
        if isinstance(result, _DecisionFailed):
            raise RuntimeError(
                f"{type(self).__name__}: the decision on rank 0 failed ({result}); "
                "see rank 0's traceback"
            )
        return result

    def all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank (``reduce_boolean_decision(all=True)``)."""
        if self._trainer is None or self.world_size == 1:
            return bool(flag)
        return bool(self._trainer.strategy.reduce_boolean_decision(bool(flag), all=True))

    def any_rank(self, flag: bool) -> bool:
        """True when ``flag`` is true on some rank."""
        if self._trainer is None or self.world_size == 1:
            return bool(flag)
        return bool(self._trainer.strategy.reduce_boolean_decision(bool(flag), all=False))

    # ------------------------------------------------------------------ randomness
    @property
    def seed(self) -> int:
        """The seed of this callback's decisions (resolved in :meth:`setup` when not given).

        Raises:
            RuntimeError: before ``setup`` when no seed was given.
        """
        if self._seed is None:
            raise RuntimeError(
                f"{type(self).__name__}: the seed is chosen in setup(); give seed= to use it "
                "earlier (a subclass overriding setup() must call super().setup(...) first)"
            )
        return self._seed

    def generator(
        self, step: int | None = None, *, salt: str = "", device: str | torch.device = "cpu"
    ) -> torch.Generator:
        """A ``torch.Generator`` seeded from :attr:`seed`, ``step`` and ``salt``.

        The same arguments give the same numbers on every rank, in every run with this seed,
        and after a resume (the seed is in the checkpoint), whatever else consumed random
        numbers. Use ``salt`` to keep independent draws of one step apart.

        Args:
            step: default ``trainer.global_step`` (0 outside a Trainer).
            salt: a label for the draw (e.g. ``"heads"``).
            device: where the generator lives.
        """
        if step is None:
            step = int(getattr(self._trainer, "global_step", 0))
        digest = hashlib.blake2b(f"{self.seed}:{int(step)}:{salt}".encode(), digest_size=8).digest()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(digest, "little") % _SEED_LIMIT)
        return g

    # ------------------------------------------------------------------ anatomy
    @property
    def model(self) -> nn.Module:
        """The module being compressed (found in :meth:`setup`)."""
        if self._model is None:
            raise RuntimeError(
                f"{type(self).__name__}: the model is found in setup(), which the Trainer calls "
                "at the start of fit/validate/test (a subclass overriding setup() must call "
                "super().setup(trainer, pl_module, stage) first)"
            )
        return self._model

    @property
    def anatomy(self) -> Anatomy:
        """The anatomy of :attr:`model` (found in :meth:`setup`)."""
        if self._anatomy is None:
            if not self.requires_anatomy:
                raise RuntimeError(
                    f"{type(self).__name__} sets requires_anatomy = False and has no anatomy"
                )
            self.model  # noqa: B018 - raises the "not set up yet" message
        return self._anatomy  # type: ignore[return-value]

    def _resolve_model(self, pl_module: nn.Module) -> nn.Module:
        cls = type(self).__name__
        if self.model_attr is None:
            inner = getattr(pl_module, "model", None)
            return inner if isinstance(inner, nn.Module) else pl_module
        if callable(self.model_attr):
            found = self.model_attr(pl_module)
            where = f"model_attr={getattr(self.model_attr, '__name__', self.model_attr)!r}"
        else:
            found = pl_module
            for i, part in enumerate(self.model_attr.split(".")):
                if not hasattr(found, part):
                    path = ".".join(["pl_module", *self.model_attr.split(".")[:i]])
                    children = (
                        [n for n, _ in found.named_children()]
                        if isinstance(found, nn.Module)
                        else []
                    )
                    raise ValueError(
                        f"{cls}: model_attr={self.model_attr!r}: {path} "
                        f"({type(found).__name__}) has no attribute {part!r}; its sub-modules: "
                        f"{children}"
                    )
                found = getattr(found, part)
            where = f"model_attr={self.model_attr!r}"
        if not isinstance(found, nn.Module):
            raise TypeError(f"{cls}: {where} must lead to an nn.Module; got {type(found).__name__}")
        return found

    def find_anatomy(self, model: nn.Module) -> Anatomy:
        """The anatomy of ``model`` (its own declaration, :attr:`patterns`, or automatic
        recognition), checked against the model by ``anatomy_of``.

        Raises:
            TypeError: the model is not recognised; the message says how to pass patterns.
            ValueError: the declaration does not match the model.
        """
        from vlcompress.models.anatomy import anatomy_of

        cls = type(self).__name__
        try:
            anatomy = anatomy_of(model, self.patterns)
        except TypeError as e:
            raise TypeError(
                f"{cls} cannot find the structure of {type(model).__name__}: {e} "
                f"Pass {cls}(patterns=AnatomyPatterns(layer=r'...(?P<index>\\d+)$', "
                "attention=..., q=..., k=..., v=..., out=..., ffn_up=..., ffn_down=...)) "
                "(from vlcompress.models.anatomy import AnatomyPatterns), or "
                f"{cls}(model_attr=...) to point at the sub-module holding the layers."
            ) from e
        return anatomy

    # ------------------------------------------------------------------ preflight
    def preflight(self, model: nn.Module) -> list[str]:
        """Every problem this callback would hit on ``model``, found before training.

        ``model`` is the module the callback compresses (what ``model_attr`` picks: a
        vlcompress task's ``.model``). The checks look only at its structure and at paths, so
        they are cheap and work on a model built on the meta device (``with
        torch.device("meta"): model = ...``): no forward, no data, no weights read.
        ``python -m vlcompress validate`` calls it before a run claims its folder, and
        :meth:`setup` raises ``ValueError`` with the same problems: one source of truth.

        The base reports the anatomy problems (when :attr:`requires_anatomy`); a subclass
        returns ``super().preflight(model) + its own`` (:meth:`preflight_anatomy` gives the
        anatomy to check against). Each problem is one sentence that names the option and the
        fix and reads well after a ``callbacks[i]: `` prefix.

        Args:
            model: the module to compress (possibly on the meta device).

        Returns:
            The problems, one string each; empty when the callback can run on ``model``.
        """
        if not self.requires_anatomy:
            return []
        try:
            self._anatomy_of(model)
        except (TypeError, ValueError) as e:
            return [str(e)]
        return []

    def preflight_anatomy(self, model: nn.Module) -> Anatomy | None:
        """The anatomy of ``model`` for a subclass's :meth:`preflight`, or ``None`` when it
        cannot be found (the base :meth:`preflight` reports why) or is not required."""
        if not self.requires_anatomy:
            return None
        try:
            return self._anatomy_of(model)
        except (TypeError, ValueError):
            return None

    def _anatomy_of(self, model: nn.Module) -> Anatomy:
        """:meth:`find_anatomy`, reusing the anatomy already found for ``model``."""
        if model is self._model and self._anatomy is not None:
            return self._anatomy
        cached = self.__dict__.get("_preflight_cache")  # (weakref to the model, anatomy)
        if cached is not None and cached[0]() is model:
            return cached[1]
        anatomy = self.find_anatomy(model)
        self._preflight_cache = (weakref.ref(model), anatomy)
        return anatomy

    def _raise_preflight(self, model: nn.Module) -> None:
        """Raise ``ValueError`` with :meth:`preflight`'s problems (from :meth:`setup`)."""
        problems = self.preflight(model)
        self.__dict__.pop("_preflight_cache", None)
        if problems:
            raise ValueError(f"{self.state_key}: " + "; ".join(problems))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Remember the trainer, agree on the seed, find the model and its anatomy, and run
        :meth:`preflight` on it (once per model).

        Subclasses overriding it call ``super().setup(trainer, pl_module, stage)`` first.

        Raises:
            TypeError: the model's structure is not recognised (see :meth:`find_anatomy`).
            ValueError: a problem :meth:`preflight` found, or an anatomy that does not match.
        """
        self._trainer = trainer
        if self._seed is None:
            self._seed = int(self.decide(lambda: torch.initial_seed() % _SEED_LIMIT))
        model = self._resolve_model(pl_module)
        if not self.requires_anatomy:
            if model is not self._model:
                self._raise_preflight(model)
                self._model = model
            return
        if self._anatomy is None or model is not self._model:
            self._anatomy = self.find_anatomy(model)
            self._model = model
            self._raise_preflight(model)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Move the owned modules to the model's device and build the owned optimiser (with
        its checkpointed state on resume). A subclass that overrides it calls ``super()``
        after creating the tensors :meth:`owned_parameters` returns."""
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        self.owned.to(device)
        params = self.owned_parameters()
        self._owned_opt = self.configure_owned_optimizer(params) if params else None
        if self._owned_opt is not None and self._owned_opt_state is not None:
            self._owned_opt.load_state_dict(self._owned_opt_state)
        if self._owned_opt is not None:
            self._owned_opt_state = None

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        """Step the owned optimiser right before the model's (see :meth:`step_owned`)."""
        self.step_owned()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Undo every effect on the module (:attr:`effects`), keep the owned optimiser's
        state for a later ``fit``, and forget the trainer (the model, anatomy, owned modules
        and state stay for :meth:`report` and the next stage)."""
        try:
            self.effects.undo()
        finally:
            if self._owned_opt is not None:
                self._owned_opt_state = self._owned_opt.state_dict()
                self._owned_opt = None
            self._trainer = None

    def state_dict(self) -> dict[str, Any]:
        """``{"format", "seed", "state"}`` and, for a callback that owns parameters,
        ``"owned"`` (``{"modules": weights of` :attr:`owned`, ``"optimizer"``: the owned
        optimiser's state}``); ``state`` is :meth:`state` (checked to load with
        ``torch.load(weights_only=True)``).

        Raises:
            TypeError: naming a value in :meth:`state` that a ``weights_only`` load refuses.
        """
        out = {"format": STATE_FORMAT, "seed": self._seed, "state": self.state()}
        _check_weights_only(out["state"], f"{type(self).__name__}.state()")
        optimizer = (
            self._owned_opt.state_dict() if self._owned_opt is not None else self._owned_opt_state
        )
        modules = {k: v.detach().cpu().clone() for k, v in self.owned.state_dict().items()}
        modules.update({k: v for k, v in self._owned_pending.items() if k not in modules})
        if modules or optimizer is not None:
            out["owned"] = {"modules": modules, "optimizer": optimizer}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take back :meth:`state_dict`'s output: the seed, then :meth:`load_state`.

        Raises:
            ValueError: a state whose layout (``format``) is not the one this version writes
                (missing, older or newer).
        """
        fmt = state_dict.get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(
                f"{self.state_key}: checkpointed callback state has format {fmt!r}; this "
                f"version reads format {STATE_FORMAT}"
            )
        seed = state_dict.get("seed")
        if seed is not None:
            if self._seed_arg is not None and seed != self._seed_arg and self.is_global_zero:
                log.warning(
                    "%s: resuming with the checkpoint's seed %d, not seed=%d",
                    self.state_key,
                    seed,
                    self._seed_arg,
                )
            self._seed = int(seed)
        owned = state_dict.get("owned") or {}
        self._owned_pending = dict(owned.get("modules") or {})
        self._load_owned_pending()
        self._owned_opt_state = owned.get("optimizer")
        self._owned_opt = None
        self.load_state(state_dict.get("state") or {})

    # ------------------------------------------------------------------ changing training
    def add_effect(self, what: str, undo: Any) -> Any:
        """Record a change to the model that :meth:`teardown` undoes; returns ``undo``.

        Args:
            what: a short description (``"head masks"``).
            undo: a handle with ``remove()`` (hook and mask handles) or a function (e.g.
                ``slimmable.detach``); a list of handles is recorded one by one.
        """
        if isinstance(undo, list):
            return self.effects.add_all(what, undo)
        return self.effects.add(what, undo)

    def wrap_training_step(self, pl_module: Any, wrapper: Callable[..., Any]) -> None:
        """Run ``wrapper(step, *args, **kwargs)`` in place of the module's ``training_step``
        until :meth:`teardown`: ``step(*args, **kwargs)`` runs the module's own step (and the
        wrappers of callbacks that wrapped it before this one). One wrapper per callback.

        Example::

            def setup(self, trainer, pl_module, stage):
                super().setup(trainer, pl_module, stage)
                self.wrap_training_step(pl_module, self._with_extra_loss)

            def _with_extra_loss(self, step, *args, **kwargs):
                loss = step(*args, **kwargs)
                return loss + 0.1 * self.extra_loss()
        """
        self.add_effect("training_step wrapper", wrap_training_step(pl_module, self, wrapper))

    quiet_logging = staticmethod(quiet_logging)

    def own_module(self, name: str, module: nn.Module) -> nn.Module:
        """Make ``module`` this callback's own: trained by the owned optimiser (its parameters
        that require grad), saved in the checkpoint, moved to the model's device. Returns the
        module to use: when ``name`` is owned already (a later stage's ``setup``), the one
        owned first, with its trained weights.

        Call it in :meth:`setup`; checkpointed weights are loaded into it on resume.

        Raises:
            ValueError: ``name`` is not a valid module name.
        """
        if name in self.owned:
            return self.owned[name]
        if not name.isidentifier():
            raise ValueError(f"{self.state_key}: owned module names are identifiers; got {name!r}")
        self.owned[name] = module
        self._load_owned_pending()
        return module

    def _load_owned_pending(self) -> None:
        """Load the checkpointed weights of owned modules that exist now."""
        for name, module in self.owned.items():
            prefix = f"{name}."
            found = {
                k[len(prefix) :]: v for k, v in self._owned_pending.items() if k.startswith(prefix)
            }
            if not found:
                continue
            module.load_state_dict(found)
            for k in found:
                del self._owned_pending[prefix + k]

    def attach_module(self, readout: str, module: nn.Module) -> None:
        """Pass the output of the anatomy's read-out ``readout`` through ``module`` (usually
        an owned adapter) until :meth:`teardown`; the model's parameters and ``state_dict``
        do not change.

        Raises:
            KeyError: an unknown read-out (the message lists them).
        """
        handle = self.anatomy.attach(self.model, readout, module)
        self.add_effect(f"{type(module).__name__} attached at {readout}", handle)

    def capture_hidden(self, readouts: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """A dict that every forward of the model fills with the outputs of ``readouts`` (the
        anatomy's read-outs; default all) until :meth:`teardown`; the last call wins.

        Raises:
            KeyError: an unknown read-out.
        """
        names = list(readouts) if readouts is not None else None
        capture = self.anatomy.capture(self.model, names)
        states = capture.__enter__()
        self.add_effect(
            f"capture of {names or 'all read-outs'}", lambda: capture.__exit__(None, None, None)
        )
        return states

    def owned_parameters(self) -> list[torch.Tensor]:
        """The tensors the owned optimiser trains: by default the parameters of
        :attr:`owned` that require grad. Override to train bare tensors (mask scores)."""
        return [p for p in self.owned.parameters() if p.requires_grad]

    def configure_owned_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """The optimiser of :meth:`owned_parameters` (override; default ``Adam(lr=1e-3)``)."""
        return torch.optim.Adam(params, lr=1e-3)

    skip_unused_owned: bool = False
    """With ``True``, an owned parameter that got no gradient on any rank in a step keeps
    ``grad=None``, so the optimiser leaves it alone (no momentum step), as plain PyTorch does
    for a module that was not used; ``False`` counts a missing gradient as zero."""

    def step_owned(self) -> None:
        """Average the owned parameters' gradients over DDP ranks (a missing gradient counts
        as zero; see :attr:`skip_unused_owned`), step the owned optimiser and clear the
        gradients. No-op without one."""
        if self._owned_opt is None:
            return
        params = [p for group in self._owned_opt.param_groups for p in group["params"]]
        used = [p.grad is not None for p in params]
        if self.skip_unused_owned and self.world_size > 1 and params:
            flags = torch.tensor(used, dtype=torch.float32, device=params[0].device)
            used = (self._trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.world_size > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self._trainer.strategy.reduce(flat, reduce_op="mean")
            start = 0
            for p, g in zip(params, grads):
                p.grad = flat[start : start + g.numel()].view_as(g).clone()
                start += g.numel()
        else:
            for p, g in zip(params, grads):
                p.grad = g
        if self.skip_unused_owned:
            for p, u in zip(params, used):
                if not u:
                    p.grad = None
        self._owned_opt.step()
        self._owned_opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ for subclasses
    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (override; default none).

        Values: tensors, ``None``/``bool``/``int``/``float``/``str`` and lists, tuples and
        dicts (str or int keys) of them.
        """
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state` returned (override together with :meth:`state`).

        Runs after :meth:`setup` with the default strategies, so :attr:`anatomy` is available:
        re-apply the state's effect on the model here (masks, replaced layers).
        """
        if state:
            raise NotImplementedError(
                f"{type(self).__name__} overrides state() but not load_state()"
            )

    def report(self) -> dict[str, Any]:
        """This callback's section of ``results.json`` (JSON-serialisable; default empty)."""
        return {}

    def report_rows(self) -> list[tuple[str, str]]:
        """``(metric, value)`` rows for the results table (default none)."""
        return []

    def advise(self, *, lightning: str, vlcompress: str) -> str:
        """The advice that fits where the callback runs: ``vlcompress`` (config keys such as
        ``optim.lr``) inside a vlcompress run, ``lightning`` (``Trainer(...)`` arguments, your
        optimiser) anywhere else."""
        return vlcompress if self.within_vlcompress_run else lightning


# ---------------------------------------------------------------------- results
def _reporters(callbacks: Iterable[Any]) -> list[Any]:
    return [
        cb
        for cb in callbacks
        if callable(getattr(cb, "report", None)) and callable(getattr(cb, "report_rows", None))
    ]


def _key(cb: Any) -> str:
    key = getattr(cb, "state_key", None)
    return key if isinstance(key, str) else type(cb).__qualname__


def collect_reports(callbacks: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """``results["callbacks"]``: ``state_key -> report()`` for every callback that has
    ``report`` and ``report_rows`` (a :class:`CompressionCallback` or a look-alike).

    Raises:
        TypeError: a report that is not a JSON-serialisable dict (naming the callback).
    """
    out: dict[str, dict[str, Any]] = {}
    for cb in _reporters(callbacks):
        rep = cb.report()
        if not isinstance(rep, Mapping):
            raise TypeError(f"{_key(cb)}.report() must return a dict; got {type(rep).__name__}")
        try:
            json.dumps(rep, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{_key(cb)}.report() is not JSON-serialisable: {e}") from e
        out[_key(cb)] = dict(rep)
    return out


def collect_report_rows(callbacks: Iterable[Any]) -> list[tuple[str, str]]:
    """The results-table rows of every reporting callback, in callback order.

    Raises:
        TypeError: a row that is not a ``(str, str)`` pair (naming the callback).
    """
    rows: list[tuple[str, str]] = []
    for cb in _reporters(callbacks):
        for row in cb.report_rows():
            if not (
                isinstance(row, tuple) and len(row) == 2 and all(isinstance(x, str) for x in row)
            ):
                raise TypeError(
                    f"{_key(cb)}.report_rows() must return (metric, value) pairs of str; "
                    f"got {row!r}"
                )
            rows.append(row)
    return rows
