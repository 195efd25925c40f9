"""Typed configuration from YAML: plain dataclasses, unknown keys rejected, errors with lines.

    recipe = load_recipe("recipes/quickstart.yaml", overrides=["critique.rounds=1"])

`from_dict(cls, data)` builds a (nested) dataclass from plain data, checking every value against
the field's annotation: str, int, float, bool, Literal[...], X | None, tuple[...], list[...],
dict[str, X] and nested dataclasses. Anything else in the data is an error naming the key path;
with a located YAML document the error also names the file and line. No reflection beyond
reading annotations: the dataclasses are the single source of truth for what a recipe may say.

A nested section given in part is merged onto that field's *own* default, not onto its class's
defaults: `OnlineSettings.train` defaults to lr 1e-5, so `train: {max_steps: 2}` (or
`--set train.max_steps=2`) keeps lr 1e-5 rather than `TrainSettings`' 1e-4.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin, get_type_hints

from cai import yamlio
from cai.errors import CaiError


class ConfigError(Exception):
    def __init__(self, message: str, path: list):
        super().__init__(message)
        self.message = message
        self.path = path


def from_dict(cls, data: Any, path: list | None = None, base: Any = None):
    """`cls` from `data`; keys absent from `data` keep `base`'s values when given (an instance of
    `cls`), else the field defaults. Nested sections merge onto the default they replace."""
    path = path or []
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping, got {_describe(data)}", path)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' (allowed: {', '.join(fields)})", path + [unknown[0]])
    values = {}
    for name, value in data.items():
        default = getattr(base, name) if base is not None else _field_default(fields[name])
        values[name] = _convert(hints[name], value, path + [name], default)
    missing = [n for n, f in fields.items() if n not in values and base is None
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key '{missing[0]}'", path)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as exc:  # from the class's own checks, with a path under this section
        raise ConfigError(exc.message, path + list(exc.path)) from None
    except CaiError as exc:
        raise ConfigError(str(exc).split(": ", 1)[-1] if exc.field else str(exc), path + ([exc.field.split(".")[-1]] if exc.field else [])) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc), path) from None


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _convert(annotation, value, path, default: Any = None):
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path, default)
            except ConfigError as exc:
                errors.append(exc.message)
        raise ConfigError(errors[0] if len(errors) == 1 else f"does not fit any of: {'; '.join(errors)}", path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"must be one of {', '.join(map(repr, args))}, got {value!r}", path)
        return value
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, path, default if type(default) is annotation else None)
    if origin in (tuple, list, Sequence) or annotation in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be a list, got {_describe(value)}", path)
        item = args[0] if args else Any
        items = [_convert(item, v, path + [i]) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or annotation is tuple else items
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping, got {_describe(value)}", path)
        key_type, value_type = args or (str, Any)
        return {_convert(key_type, k, path + [k]): _convert(value_type, v, path + [k]) for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {_describe(value)}", path)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {_describe(value)}", path)
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"must be a number, got {_describe(value)}", path)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, got {_describe(value)}", path)
        return value
    raise ConfigError(f"unsupported setting type {annotation}", path)


def _describe(value) -> str:
    if value is None:
        return "nothing"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:40]}" if kind not in ("list", "mapping") else kind


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """`key.sub=value` overrides; values are parsed as YAML scalars (1, 0.5, true, [a, b])."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise CaiError(f"override '{override}' must look like key.sub=value")
        try:
            value = yamlio.loads(raw, f"override {key}").data
        except CaiError:
            value = raw
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            existing = target.get(part)
            if existing is None:
                existing = target[part] = {}
            if not isinstance(existing, dict):
                raise CaiError(f"override '{override}': '{part}' is not a section")
            target = existing
        target[parts[-1]] = value
    return data


def load_located(cls, document: yamlio.LocatedYaml):
    """`from_dict` on a YAML document; errors name the file, the line and the key path."""
    try:
        return from_dict(cls, document.data if document.data is not None else {})
    except ConfigError as exc:
        path = list(exc.path)
        key = path.pop() if path and isinstance(path[-1], str) else None
        raise document.error(exc.message, path, key) from None
