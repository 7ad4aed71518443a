"""How a configuration is read: nested mappings (YAML, ``--set SECTION.FIELD=VALUE`` overrides, the
Launchpad) built into typed dataclasses, with an error naming the field and what was expected for
anything else; and which fields a hash covers. The vocabulary itself (the sections, their fields,
defaults and help) is :mod:`opsdl_core.config`."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

__all__ = ["ConfigError", "build", "check", "check_finite", "deep_merge", "hashed_fields", "parse_overrides"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check(cond: bool, field_name: str, expected: str, got: Any) -> None:
    """Raise :class:`ConfigError` ``"FIELD: expected WHAT, got VALUE"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{field_name}: expected {expected}, got {got!r}")


def check_finite(obj: Any, path: str = "") -> None:
    """Raise :class:`ConfigError` naming the first number in ``obj`` (a config section, its lists and
    mappings, recursively) that is NaN or infinite: no field means anything by one (``null`` is "off")."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            check_finite(getattr(obj, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{path}.{k}")
    elif isinstance(obj, float):
        check(math.isfinite(obj), path, "a finite number", obj)


def hashed_fields(obj: Any) -> Any:
    """``obj`` as plain data without the dataclass fields declared ``hashed=False`` (field metadata)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: hashed_fields(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if f.metadata.get("hash", True)}
    if isinstance(obj, (list, tuple)):
        return [hashed_fields(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): hashed_fields(v) for k, v in obj.items()}
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", "loss.kind=jsd"]`` -> nested dict; values parsed as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected SECTION.FIELD=VALUE")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def deep_merge(a: dict, b: dict) -> dict:
    """``a`` with ``b`` merged in, mapping by mapping (``b`` wins); neither is changed."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(cls: type, data: Any, path: str) -> Any:
    """The dataclass ``cls`` from the mapping ``data`` (at ``path`` in the whole config), every value
    coerced to its field's type; unknown fields and wrong types raise :class:`ConfigError`."""
    where = path or "config"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} matches none of {errors}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{name}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, f"{name}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        seq = [_coerce(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1] if args else Any, v, f"{name}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value
