"""Field metadata and the shared checks of component options dataclasses.

A model's options derive from :class:`ModelOptions` and declare their limits once, on the
field: sizes with :func:`positive`, rates with :func:`probability` or :func:`in_range`, paths
with :func:`local_path`, and a closed set of values with a ``typing.Literal`` annotation::

    @dataclass(frozen=True)
    class TinyOptions(ModelOptions):
        hidden_size: int = positive(64)
        dropout: float = probability(0.1)
        packing: Literal["padded", "stack"] = "padded"

        def check(self) -> None:  # cross-field checks only; the fields are already checked
            if self.hidden_size % 8:
                raise ValueError("Tiny hidden_size must be a multiple of 8; e.g. 64.")

Config validation (:mod:`vlcompress.config`) reads the same metadata to report every bad value
of an experiment at once; :func:`check_fields` enforces it when the dataclass is built
directly in Python. (:func:`choices` metadata is the older way to declare allowed values; the
configuration schema's sections still use it. Model options use ``Literal``.)
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

__all__ = [
    "ModelOptions",
    "check_fields",
    "choices",
    "closest",
    "field_problem",
    "in_range",
    "literal_choices",
    "local_path",
    "path_problem",
    "positive",
    "probability",
]

_T = TypeVar("_T")


def choices(*values: Any) -> dict[str, Any]:
    """Field metadata: the value must be one of ``values``.

    Model options declare their choices with a ``typing.Literal`` annotation instead (read by
    :func:`check_fields` and by config validation).
    """
    return {"choices": values}


def in_range(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = True
) -> dict[str, Any]:
    """Field metadata: ``lo <= value`` (``<`` when ``lo_open``) and ``value < hi`` (``<=``
    when not ``hi_open``)."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


def positive(default: _T) -> _T:
    """A dataclass field whose value must be at least 1 (a size or a count); ``None`` (an
    optional size left unset) passes.

    Args:
        default: the field's default.

    Example::

        hidden_size: int = positive(512)
        image_size: int | None = positive(None)
    """
    return dataclasses.field(default=default, metadata=in_range(1))


def probability(default: _T) -> _T:
    """A dataclass field whose value must lie in ``[0, 1)`` (a dropout rate).

    Args:
        default: the field's default.

    Example::

        dropout: float = probability(0.1)
    """
    return dataclasses.field(default=default, metadata=in_range(0.0, 1.0))


def local_path(kind: str = "file_or_dir") -> dict[str, Any]:
    """Field metadata: a local path that must exist when set (``file``, ``dir`` or
    ``file_or_dir``); ``python -m vlcompress validate`` checks it before anything runs."""
    if kind not in ("file", "dir", "file_or_dir"):
        raise ValueError(f"local_path: kind must be 'file', 'dir' or 'file_or_dir', got {kind!r}")
    return {"path": kind}


def path_problem(meta: Any, value: Any) -> str | None:
    """What is wrong with the path ``value`` under the field metadata ``meta`` (``None`` if
    nothing, or if the field is not a :func:`local_path` or unset)."""
    kind = meta.get("path")
    if kind is None or value in (None, ""):
        return None
    if str(value).startswith("backbone:"):  # a built backbone, resolved (and checked) on use
        if meta.get("backbone"):
            return None
        return (
            f"{value}: this option reads a local path; only options that load a model's "
            "published layout (ViLT's pretrained) take backbone:<name>"
        )
    path = Path(str(value)).expanduser()
    if not path.exists():
        hint = " (a placeholder? set it to a real path)" if "/path/to" in str(value) else ""
        return f"{value} does not exist{hint}"
    if kind == "file" and not path.is_file():
        return f"{value} is a folder; give a file"
    if kind == "dir" and not path.is_dir():
        return f"{value} is a file; give a folder"
    return None


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values a ``typing.Literal`` annotation allows (``None`` included for an optional
    ``Literal[...] | None``), or ``None`` when the annotation is not a closed set of values.

    Example::

        literal_choices(Literal["padded", "stack"])         # ("padded", "stack")
        literal_choices(Literal["a"] | None)                # ("a", None)
        literal_choices(int)                                # None
    """
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return typing.get_args(annotation)
    if origin not in (Union, types.UnionType):
        return None
    values: list[Any] = []
    for arg in typing.get_args(annotation):
        if arg is type(None):
            values.append(None)
        elif typing.get_origin(arg) is typing.Literal:
            values.extend(typing.get_args(arg))
        else:
            return None  # e.g. ``Literal["auto"] | int``: not a closed set
    return tuple(values)


def closest(value: Any, allowed: typing.Iterable[Any]) -> str:
    """``"; did you mean 'x'?"`` naming the allowed values closest to the string ``value``
    (empty when none is close, or ``value`` is not a string)."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(a) for a in allowed], n=3, cutoff=0.5)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def field_problem(meta: Any, value: Any, allowed: typing.Sequence[Any] | None = None) -> str | None:
    """What is wrong with ``value`` under the field metadata ``meta`` (``None`` if nothing).

    ``allowed`` overrides the metadata's choices (a ``Literal`` annotation's values, or
    registry-backed fields)."""
    options = allowed if allowed is not None else meta.get("choices")
    if options is not None and value not in options:
        return f"{value!r} is not one of {list(options)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        return f"must be {'>' if meta.get('lo_open') else '>='} {lo}, got {value}"
    if hi is not None and (value > hi or (meta.get("hi_open", True) and value == hi)):
        return f"must be {'<' if meta.get('hi_open', True) else '<='} {hi}, got {value}"
    return None


@functools.cache
def _field_choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """``{field name: allowed values}`` of the ``Literal``-annotated fields of ``cls``."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation naming something imported only for type checking
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        allowed = literal_choices(hints.get(f.name))
        if allowed is not None:
            out[f.name] = allowed
    return out


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj``: its ``Literal`` annotation's values
    (or its :func:`choices` metadata) and its range.

    Raises:
        ValueError: listing every field whose value is out of range or not allowed, each with
            the allowed values (and the closest ones to a mistyped string).

    Example::

        MCANOptions(packing="stak")  # its __post_init__ calls check_fields(self):
        # ValueError: MCANOptions: packing: 'stak' is not one of ['padded', 'attention',
        # 'stack']; did you mean 'stack'?
    """
    allowed_by_field = _field_choices(type(obj))
    problems = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        allowed = allowed_by_field.get(f.name, f.metadata.get("choices"))
        msg = field_problem(f.metadata, value, allowed)
        if msg:
            hint = closest(value, allowed) if allowed is not None and value not in allowed else ""
            problems.append(f"{f.name}: {msg}{hint}")
    if problems:
        raise ValueError(f"{type(obj).__name__}: " + "; ".join(problems))


@dataclass(frozen=True)
class ModelOptions:
    """Base class of a model's options dataclass: the shared checks, run on every instance.

    Building an instance checks every field (:func:`check_fields`: ``Literal`` choices, ranges
    from :func:`positive` / :func:`probability` / :func:`in_range`), then the subclass's
    cross-field :meth:`check`. A subclass is a frozen dataclass that documents every field under
    ``Attributes:``, gives every field a default (an experiment may omit any), and overrides
    :meth:`check` rather than ``__post_init__``.

    Raises:
        ValueError: from the field checks (every bad field at once) or from :meth:`check`.

    Example::

        @dataclass(frozen=True)
        class TinyOptions(ModelOptions):
            hidden_size: int = positive(64)
            num_heads: int = positive(4)

            def check(self) -> None:
                if self.hidden_size % self.num_heads:
                    raise ValueError("Tiny hidden_size must be divisible by num_heads.")
    """

    def __post_init__(self) -> None:
        check_fields(self)
        self.check()

    def check(self) -> None:
        """Cross-field checks of the subclass (the fields are checked one by one before).

        Raises:
            ValueError: naming the fields and the fix.
        """
