"""Field metadata for component options dataclasses: allowed values and ranges.

Options dataclasses declare their limits once, on the field::

    @dataclass(frozen=True)
    class LPFOptions:
        gamma: float = field(default=5.0, metadata=in_range(0.0))

        def __post_init__(self) -> None:
            check_fields(self)

Config validation (:mod:`vlcompress.config`) reads the same metadata to report every bad value
of an experiment at once; :func:`check_fields` enforces it when the dataclass is built
directly in Python.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

__all__ = ["check_fields", "choices", "field_problem", "in_range", "local_path", "path_problem"]


def choices(*values: Any) -> dict[str, Any]:
    """Field metadata: the value must be one of ``values``."""
    return {"choices": values}


def in_range(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = True
) -> dict[str, Any]:
    """Field metadata: ``lo <= value`` (``<`` when ``lo_open``) and ``value < hi`` (``<=``
    when not ``hi_open``)."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open}


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
    path = Path(str(value)).expanduser()
    if not path.exists():
        hint = " (a placeholder? set it to a real path)" if "/path/to" in str(value) else ""
        return f"{value} does not exist{hint}"
    if kind == "file" and not path.is_file():
        return f"{value} is a folder; give a file"
    if kind == "dir" and not path.is_dir():
        return f"{value} is a file; give a folder"
    return None


def field_problem(meta: Any, value: Any, allowed: list[str] | None = None) -> str | None:
    """What is wrong with ``value`` under the field metadata ``meta`` (``None`` if nothing).

    ``allowed`` overrides the metadata's choices (registry-backed fields)."""
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


def check_fields(obj: Any) -> None:
    """Check every field of the dataclass instance ``obj`` against its metadata.

    Raises:
        ValueError: listing every field whose value is out of range or not allowed.
    """
    problems = []
    for f in dataclasses.fields(obj):
        msg = field_problem(f.metadata, getattr(obj, f.name))
        if msg:
            problems.append(f"{f.name}: {msg}")
    if problems:
        raise ValueError(f"{type(obj).__name__}: " + "; ".join(problems))
