"""One registry for every component: models, data modules, losses, callbacks and tasks.

A component registers itself in its own file with a decorator, together with the dataclass of
its options (timm's ``@register_model`` idea; no central table to edit)::

    @register("loss", "lpf")
    class LPFLoss(VQALoss):
        def __init__(self, gamma: float = 5.0) -> None: ...

    register(
        "model", "mcan_small", options=MCANOptions, defaults=MCAN_VARIANTS["small"],
        context=("vocab_size", "num_answers"),
        summary="MCAN-small as published: hidden 512, 8 heads, FFN 2048, 6 + 6 layers.",
    )(MCAN)

Each variant of a model is one ``register`` call in the model's file, with its own defaults and
summary (``grep -rn mcan_small vlcompress/models`` finds it).

Without ``options=``, the options dataclass is derived from the builder's signature (every
keyword argument with a default and a type hint that is not context) and the component is
validated by building it, so its ``__init__`` must be cheap (argument checks only). With an
explicit dataclass, the builder receives the options object as its first argument and the
dataclass's ``__post_init__`` carries the cross-field checks.

Every experiment names a component the same way, ``{name: ..., options: {...}}``; config
validation (:mod:`vlcompress.config`) checks the options against :attr:`Component.options`
before any data is touched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import importlib
import inspect
import logging
import pkgutil
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "Component",
    "UnknownComponentError",
    "build",
    "components",
    "isolated",
    "get",
    "names",
    "options_from_signature",
    "register",
]

KINDS: dict[str, str] = {
    "model": "vlcompress.models",
    "datamodule": "vlcompress.datamodules",
    "loss": "vlcompress.losses",
    "callback": "vlcompress.callbacks",
    "task": "vlcompress.tasks",
}
"""Component kinds and the package whose modules register the built-in ones."""

ENTRY_POINT_GROUP = "vlcompress.components"
"""Third-party packages register components by naming a module in this entry-point group."""

_REGISTRY: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
_LOADED: set[str] = set()


class UnknownComponentError(KeyError):
    """A component name that is not registered; the message lists the closest names."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class Component:
    """A registered component.

    Attributes:
        kind: one of :data:`KINDS`.
        name: its registered name.
        builder: class or function that builds it.
        options: the dataclass whose fields are its valid options.
        defaults: an ``options`` instance holding this name's defaults (variants of one model
            share a dataclass with different defaults), or ``None`` for the dataclass defaults.
        context: builder arguments supplied by the framework, not by the experiment (e.g. a
            model's ``vocab_size``).
        derived: True when ``options`` was derived from the builder's signature; such
            components are validated by building them.
        summary: one sentence on what it is: ``register(..., summary=...)``, else the first
            sentence of the builder's docstring.
    """

    kind: str
    name: str
    builder: Callable[..., Any]
    options: type
    defaults: Any = None
    context: tuple[str, ...] = ()
    derived: bool = False
    summary: str = ""

    def make_options(self, values: Mapping[str, Any] | None = None) -> Any:
        """The options object for ``values`` (defaults filled in; lists become tuples where
        the field is a tuple).

        Raises:
            TypeError: for unknown option names.
            ValueError: from the dataclass's own checks (``__post_init__``).
        """
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.options)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(
                f"{self.kind} {self.name!r}: unknown option(s) {unknown}; known: {sorted(known)}"
            )
        hints = typing.get_type_hints(self.options)
        for k, v in values.items():
            if isinstance(v, list) and typing.get_origin(hints.get(k)) is tuple:
                values[k] = tuple(v)
        if self.defaults is not None:
            return dataclasses.replace(self.defaults, **values)
        return self.options(**values)

    def build(self, options: Mapping[str, Any] | Any = None, **context: Any) -> Any:
        """Build the component from ``options`` (a mapping or an options object) and the
        framework-supplied ``context`` arguments.

        Raises:
            TypeError: for unknown option names.
            ValueError: from the options' or the component's own checks.
        """
        if options is None or isinstance(options, Mapping):
            options = self.make_options(options)
        if self.derived:
            kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
            return self.builder(**context, **kwargs)
        return self.builder(options, **context)

    def validate(self, values: Mapping[str, Any]) -> None:
        """Run the component's own checks on ``values`` without touching any data: construct
        the options object, and for derived options build the component itself.

        Raises:
            TypeError, ValueError: the component's own message.
        """
        options = self.make_options(values)
        if self.derived:
            self.build(options)


def _summary(obj: Any) -> str:
    """The first sentence of ``obj``'s docstring (its first paragraph, cut after the first
    full stop), on one line."""
    doc = (inspect.getdoc(obj) or "").strip()
    paragraph = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    match = re.search(r"(?<![.\w]\w)\.(\s|$)", paragraph)  # not "e.g." / "i.e."
    return paragraph[: match.start() + 1] if match else paragraph


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Type hints of ``fn``'s parameters; one that cannot be resolved (a name imported only
    for type checking) becomes ``Any`` without losing the others."""
    try:
        return typing.get_type_hints(fn)
    except Exception:
        pass
    hints: dict[str, Any] = {}
    globalns = getattr(fn, "__globals__", {})
    for name, ann in getattr(fn, "__annotations__", {}).items():
        try:
            hints[name] = typing.get_type_hints(
                type("_One", (), {"__annotations__": {name: ann}}), globalns=globalns
            )[name]
        except Exception:
            hints[name] = Any
    return hints


def options_from_signature(fn: Callable[..., Any], context: tuple[str, ...] = ()) -> type:
    """A dataclass whose fields are ``fn``'s keyword arguments with defaults (``self``,
    ``*args``, ``**kwargs`` and the ``context`` names left out).

    Raises:
        TypeError: when an option argument has no default (the experiment could not omit it).
    """
    target = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(target)
    hints = _hints(target)
    specs = []
    for p in sig.parameters.values():
        if p.name == "self" or p.name in context:
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)}: argument {p.name!r} has no default; give it "
                "one, list it in register(..., context=...), or register an options dataclass."
            )
        default = p.default
        spec = (
            field(default_factory=lambda d=default: type(d)(d))
            if isinstance(default, (list, dict, set))
            else field(default=default)
        )
        specs.append((p.name, hints.get(p.name, Any), spec))
    name = f"{getattr(fn, '__name__', 'Component')}Options"
    return dataclasses.make_dataclass(name, specs, frozen=True)


def register(
    kind: str,
    name: str | None = None,
    *,
    options: type | None = None,
    defaults: Any = None,
    context: tuple[str, ...] = (),
    summary: str | None = None,
) -> Callable[[Any], Any]:
    """Class/function decorator registering a component under ``name``.

    Args:
        kind: one of :data:`KINDS`.
        name: registered name (default: the builder's ``__name__`` in lower case).
        options: the options dataclass; derived from the builder's signature when omitted.
        defaults: an ``options`` instance with this name's defaults (variants).
        context: builder arguments the framework supplies (not options).
        summary: one sentence on what this name is (``python -m vlcompress list`` shows it);
            default: the first sentence of the builder's docstring. Variants of one builder
            each give their own.

    Raises:
        ValueError: for an unknown kind, a name registered twice by different builders, or an
            empty ``summary``.
        TypeError: when ``options`` is not a dataclass.

    Example::

        @register("callback", "finite_loss_guard")
        class FiniteLossGuard(Callback): ...

        register("model", "mcan_tiny", options=MCANOptions, defaults=MCAN_VARIANTS["tiny"],
                 context=("vocab_size", "num_answers"), summary="A tiny MCAN for tests.")(MCAN)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {sorted(KINDS)}")
    if summary is not None and not summary.strip():
        raise ValueError(f"register({kind!r}, {name!r}): summary is empty; give one sentence.")

    def decorate(builder: Any) -> Any:
        key = name or builder.__name__.lower()
        derived = options is None
        opts = options_from_signature(builder, context) if derived else options
        if not dataclasses.is_dataclass(opts):
            raise TypeError(f"register({kind!r}, {key!r}): options must be a dataclass")
        old = _REGISTRY[kind].get(key)
        if old is not None and (old.builder.__module__, old.builder.__qualname__) != (
            builder.__module__,
            builder.__qualname__,
        ):
            raise ValueError(
                f"{kind} {key!r} is registered twice: by {old.builder.__module__}."
                f"{old.builder.__qualname__} and by {builder.__module__}.{builder.__qualname__}"
            )
        text = " ".join(summary.split()) if summary is not None else _summary(builder)
        _REGISTRY[kind][key] = Component(
            kind, key, builder, opts, defaults, tuple(context), derived, text
        )
        return builder

    return decorate


def _load(kind: str) -> None:
    """Import every module of ``kind``'s package (each registers itself) and the modules
    named by installed plugins' entry points."""
    if kind in _LOADED:
        return
    pkg = importlib.import_module(KINDS[kind])
    for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            importlib.import_module(info.name)  # a broken built-in fails loudly, every time
    _LOADED.add(kind)
    _load_plugins()


def _load_plugins() -> None:
    """Import each installed plugin's entry point once; a broken one is logged and skipped."""
    if "plugins" in _LOADED:
        return
    _LOADED.add("plugins")
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must not break the built-ins or other plugins
            log.warning("vlcompress plugin %r (%s) failed to load: %s", ep.name, ep.value, e)


def components(kind: str) -> dict[str, Component]:
    """Every registered component of ``kind`` (built-ins loaded on first use)."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds: {sorted(KINDS)}")
    _load(kind)
    return dict(_REGISTRY[kind])


def names(kind: str, pattern: str = "*") -> list[str]:
    """Sorted names of ``kind`` matching the shell-style ``pattern`` (e.g. ``"mcan_*"``)."""
    return sorted(n for n in components(kind) if fnmatch.fnmatch(n, pattern))


def get(kind: str, name: str) -> Component:
    """The component ``name`` of ``kind``.

    Raises:
        UnknownComponentError: naming the closest registered names.
    """
    found = components(kind).get(name) if isinstance(name, str) else None
    if found is None:
        known = names(kind)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownComponentError(
            f"unknown {kind} {name!r}; {hint + ' ' if hint else ''}registered: {', '.join(known)}"
        )
    return found


def build(kind: str, name: str, options: Mapping[str, Any] | None = None, **context: Any) -> Any:
    """Build the registered component ``name`` of ``kind`` from ``options`` and ``context``.

    Raises:
        UnknownComponentError: for an unregistered name (the closest names are listed).
        TypeError: for unknown option names.
        ValueError: from the options' or the component's own checks.
    """
    return get(kind, name).build(options, **context)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Registrations made inside the block are undone when it ends (for tests): every built-in
    kind is loaded first, so nothing loaded inside is lost afterwards."""
    for kind in KINDS:
        _load(kind)
    saved = {k: dict(v) for k, v in _REGISTRY.items()}
    try:
        yield
    finally:
        for kind, entries in saved.items():
            _REGISTRY[kind].clear()
            _REGISTRY[kind].update(entries)
