"""Typed dataclass configs from YAML, with `--set a.b=value` overrides.

Why a small loader of our own rather than a framework: every error must name the dotted field (`train.lr`)
and say what was expected, unknown keys must be refused (a typo silently ignored is a wasted GPU-day), and the
resolved config must round-trip to YAML so it can be saved beside every run and reloaded for `--resume`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from raydc.errors import ConfigError, UserError

T = TypeVar("T")


def type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, field: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(field, f"got {value!r}, expected one of {type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(field, f"must not be null (expected {type_name(tp)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, field)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(field, f"got {value!r}, expected {type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(field, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, field)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"got {value!r}, expected {type_name(tp)}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(field, f"got {value!r}, expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(field, f"got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(field, f"got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(field, f"got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(field, f"got {value!r}, expected a string")
    raise TypeError(f"unsupported config type {tp!r} for {field}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrongly typed values."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{unknown[0]}", f"unknown field; known fields here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        field = f"{prefix}.{name}" if prefix else name
        kwargs[name] = coerce(value, hints[name], field)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        missing = [n for n, f in fields.items() if n not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        field = f"{prefix}.{missing[0]}" if prefix and missing else (missing[0] if missing else prefix)
        raise ConfigError(field, "is required") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3); the value is parsed as YAML so `true`, `[1,2]` and `null` work."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    return key.split("."), value


def set_field(data: dict, path: typing.Sequence[str], value: Any) -> dict:
    """A copy of `data` with the field at `path` (["cluster", "k"]) set to `value`; the sections on the way are
    copied (the given mapping is left as it was) and made when absent or null."""
    data = dict(data)
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(".".join(path), f"'{part}' is not a section")
        child = dict(child)
        node[part] = child
        node = child
    node[path[-1]] = value
    return data


def apply_overrides(data: dict, overrides: typing.Iterable[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        data = set_field(data, path, value)
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    return parse_yaml(p.read_text(), p)


def parse_yaml(text: str, where: str | Path) -> dict:
    """A config's text (read from a file or an object store, named `where` in errors) as a mapping."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {where} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {where} must hold a mapping at top level")
    return data


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


RESUMABLE = "resumable"  # the metadata key `resumable()` sets


def resumable(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that a resumed run or sweep may take from the new config: a budget (how long to go on) or
    where and how to run, nothing that changes what the finished rounds computed. Declared beside the field so
    that a new budget is one edit; `resumable_keys` finds them, method sections included."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={RESUMABLE: True})
    return dataclasses.field(default=default, metadata={RESUMABLE: True})


def resumable_keys(cls: type) -> frozenset[str]:
    """The dotted names of `cls`'s resumable fields, down through its sections (fields whose default factory is
    itself a config dataclass)."""
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get(RESUMABLE):
            keys.add(f.name)
        factory = f.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            keys |= {f"{f.name}.{k}" for k in resumable_keys(factory)}
    return frozenset(keys)


def flatten(d: dict, prefix: str = "", opaque: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"a.b": value} for a nested mapping; the keys in `opaque` stay whole (a sweep's `space`)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in opaque:
            out.update(flatten(v, f"{prefix}{k}.", opaque))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(saved: dict, given: dict, opaque: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, given value) for every field the two configs (as dicts) disagree on, in key
    order: what `--resume` of a run and of a sweep checks against their resumable fields."""
    a, b = flatten(saved, opaque=opaque), flatten(given, opaque=opaque)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
