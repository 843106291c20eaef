"""Validation of an experiment: every problem reported at once, with the closest valid names.

Checks unknown keys, types, ranges and allowed values of every section, the registered name of
every component, each component's options against its own options dataclass, and finally the
component's cross-field checks (the options dataclass's ``__post_init__``, or building a cheap
component such as a callback) — all before any data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf

from vlcompress import registry
from vlcompress.config.schema import COMPONENT_SECTIONS, ComponentConfig, ExperimentConfig
from vlcompress.options import closest, field_problem, literal_choices

__all__ = ["ConfigError", "validate", "validate_component"]


class ConfigError(ValueError):
    """One or more configuration problems; ``errors`` lists them all."""

    def __init__(self, errors: list[str], source: str = "configuration") -> None:
        self.errors = errors
        if len(errors) == 1:  # one problem, one line
            super().__init__(errors[0] if source == "configuration" else f"{source}: {errors[0]}")
            return
        super().__init__(
            f"{source} has {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors)
        )


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check_type(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        inner = (typing.get_args(tp) or (Any,))[0]
        return isinstance(value, (list, tuple)) and all(_check_type(v, inner) for v in value)
    if origin is dict:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] in (bool, int, float, str):  # e.g. dict[str, float]
            return isinstance(value, dict) and all(_check_type(v, args[1]) for v in value.values())
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a type we cannot check from YAML (a protocol, a string annotation)


def _suggest(key: str, valid: list[str], what: str = "valid keys") -> str:
    if not valid:
        return f"{what}: (none)"
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    if close:
        return f"did you mean {' or '.join(repr(c) for c in close)}?"
    return f"{what}: {', '.join(valid)}"


def _nested_key(cls: type, key: str, path: str) -> str | None:
    """The dotted key ``key`` names one level down (``max_epochs`` -> ``trainer.max_epochs``),
    if exactly one section of ``cls`` has such a field."""
    hints = typing.get_type_hints(cls)
    found = [
        f"{path}{f.name}.{key}"
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
        and hints[f.name] is not ComponentConfig
        and key in {g.name for g in dataclasses.fields(hints[f.name])}
    ]
    return found[0] if len(found) == 1 else None


def _validate(cls: type, data: Any, path: str, errors: list[str]) -> None:
    """Check ``data`` (a mapping) against the dataclass ``cls``; append problems to ``errors``."""
    if not isinstance(data, dict):
        errors.append(
            f"{path.rstrip('.') or 'config'}: expected a mapping of {cls.__name__} fields, "
            f"got {type(data).__name__} {data!r}"
        )
        return
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            nested = _nested_key(cls, str(key), path)
            hint = f"did you mean {nested!r}?" if nested else _suggest(str(key), sorted(fields))
            errors.append(f"{path}{key}: unknown key; {hint}")
    for name, f in fields.items():
        if name not in data:
            continue
        value, tp, where = data[name], hints[name], f"{path}{name}"
        if tp is ComponentConfig:
            validate_component(COMPONENT_SECTIONS[name], value, f"{where}.", errors)
            continue
        if typing.get_origin(tp) is list and typing.get_args(tp) == (ComponentConfig,):
            if not isinstance(value, list):
                errors.append(f"{where}: expected a list of {{name, options}}, got {value!r}")
                continue
            for i, item in enumerate(value):
                validate_component("callback", item, f"{where}[{i}].", errors)
            continue
        if dataclasses.is_dataclass(tp):
            _validate(tp, value, f"{where}.", errors)
            continue
        if not _check_type(value, tp):
            allowed = literal_choices(tp)
            hint = closest(value, allowed) if allowed is not None else ""
            errors.append(
                f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}{hint}"
            )
            continue
        problem = field_problem(f.metadata, value)
        if problem:
            hint = ""
            if "choices" in f.metadata and isinstance(value, str):
                hint = "; " + _suggest(value, [str(c) for c in f.metadata["choices"]], "allowed")
            errors.append(f"{where}: {problem}{hint}")


def validate_component(kind: str, data: Any, path: str, errors: list[str]) -> None:
    """Check one ``{name, options}`` component of registry ``kind``; append problems."""
    if not isinstance(data, dict) or "name" not in data:
        glued = [k for k, v in (data.items() if isinstance(data, dict) else []) if v is None]
        hint = ""
        if glued and ":" in str(glued[0]):  # YAML reads {name:x} as the key 'name:x'
            key, _, value = str(glued[0]).partition(":")
            hint = f" (a missing space after the colon? write {{{key}: {value}}})"
        errors.append(
            f"{path.rstrip('.')}: expected a mapping {{name: <registered {kind}>, options: "
            f"{{...}}}}, got {data!r}{hint}"
        )
        return
    extra = sorted(set(data) - {"name", "options"})
    for key in extra:
        hint = (
            f"'{key}' is a section of its own ({key}.name=...)"
            if key in COMPONENT_SECTIONS
            else f"did you mean {path}options.{key}?"
        )
        errors.append(
            f"{path}{key}: unknown key; a component has only 'name' and 'options' ({hint})"
        )
    name = data["name"]
    if not isinstance(name, str):
        errors.append(f"{path}name: expected the name of a registered {kind}, got {name!r}")
        return
    try:
        comp = registry.get(kind, name)
    except registry.UnknownComponentError as e:
        errors.append(f"{path}name: {e}")
        return
    options = data.get("options") or {}
    if isinstance(options, dict) and options and not dataclasses.fields(comp.options):
        errors.append(f"{path}options: {kind} {name!r} takes no options; got {sorted(options)}")
        return
    before = len(errors)
    _validate(comp.options, _lists(options), f"{path}options.", errors)
    if extra or not isinstance(options, dict) or (len(errors) > before and not comp.derived):
        return
    if len(errors) == before:
        try:
            comp.validate(options)
            return
        except (TypeError, ValueError) as e:
            if not comp.derived:
                errors.append(f"{path}options: {e}")
                return
    # The component's own checks stop at their first problem: set aside the options each
    # message names and ask again, so that every bad value is reported at once (options are
    # set aside, never checked alone: a cross-field check must see its partners).
    known = {f.name for f in dataclasses.fields(comp.options)}
    flagged = {e.split(":")[0] for e in errors[before:]}
    rest = {k: v for k, v in options.items() if k in known and f"{path}options.{k}" not in flagged}
    found: list[str] = []
    while rest:
        try:
            comp.validate(rest)
            break
        except (TypeError, ValueError) as e:
            found.append(str(e))
            named = [k for k in rest if re.search(rf"\b{re.escape(k)}\b", str(e))]
            if not named:
                break
            for k in named:
                rest.pop(k)
    errors.extend(f"{path}options: {e}" for e in found)


def _lists(d: Any) -> Any:
    return (
        {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if isinstance(d, dict)
        else d
    )


def _build(cls: type, data: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value = hints[f.name], data[f.name]
        if typing.get_origin(tp) is list and typing.get_args(tp) == (ComponentConfig,):
            value = [_build(ComponentConfig, v) for v in value]
        elif dataclasses.is_dataclass(tp):
            value = _build(tp, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def lr_scale_problems(scale: Any) -> list[str]:
    """``optim.lr_scale``: regexes that compile, positive multipliers (checked before any data
    is touched, and again by the task's ``param_groups``; that every pattern matches a parameter
    is checked when the optimiser is built)."""
    if not isinstance(scale, dict):
        return []
    problems = []
    for pattern, factor in scale.items():
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            hint = ""
            if ":" in str(pattern) and factor is None:
                key = str(pattern).split(":")[0]
                hint = f" (a missing space after the colon? write {{{key!r}: 0.1}})"
            problems.append(f"optim.lr_scale.{pattern}: {factor!r} is not a positive number{hint}")
        try:
            re.compile(str(pattern))
        except re.error as e:
            problems.append(f"optim.lr_scale: {pattern!r} is not a regular expression ({e})")
    return problems


def validate(cfg: DictConfig | dict, source: str = "configuration") -> ExperimentConfig:
    """Check ``cfg`` against the schema and every component's options; build the typed
    :class:`ExperimentConfig`.

    Raises:
        ConfigError: listing every problem found.
    """
    try:
        data = (
            OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        )
    except Exception as e:  # interpolation errors and the like
        raise ConfigError([f"cannot resolve the configuration: {e}"], source) from e
    data.pop("defaults", None)
    errors: list[str] = []
    _validate(ExperimentConfig, data, "", errors)
    errors += lr_scale_problems((data.get("optim") or {}).get("lr_scale"))
    if isinstance(data.get("init_from"), str) and not data["init_from"].strip():
        errors.append(
            "init_from: an empty path; give the previous stage's run folder or a .ckpt file, "
            "or null"
        )
    if data.get("init_grow") and not data.get("init_from"):
        errors.append(
            "init_grow: true grows a shallower checkpoint's layers into this model, but no "
            "init_from names one; give init_from=<run folder or .ckpt> or drop init_grow"
        )
    if errors:
        raise ConfigError(errors, source)
    return _build(ExperimentConfig, data)
