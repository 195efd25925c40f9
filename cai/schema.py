"""JSON Schemas shipped with cai, and validation errors a person can act on.

jsonschema's own messages quote whole objects and say "is not valid under any of the given
schemas"; here each error becomes one line naming the file, the line and the field, and the
first error in file order is reported (with a count of the rest), like a compiler would.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema

from cai.errors import CaiError
from cai.yamlio import LocatedYaml, format_path

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


@lru_cache(maxsize=None)
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate_located(name: str, document: LocatedYaml) -> None:
    """Validate a YAML document; raise the first error in file order as a `CaiError`."""
    errors = list(validator(name).iter_errors(document.data))
    if not errors:
        return
    located = []
    for error in errors:
        path, key = list(error.absolute_path), _offending_key(error)
        located.append((document.line_of(path, key) or 0, error, path, key))
    located.sort(key=lambda item: item[0])
    _, error, path, key = located[0]
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    raise document.error(describe(error) + more, path, key)


def validate_record(name: str, record: Any, source: str) -> None:
    """Validate one data row (JSONL line, dataset row); `source` names file and line."""
    error = jsonschema.exceptions.best_match(validator(name).iter_errors(record))
    if error is not None:
        path = list(error.absolute_path)
        key = _offending_key(error)
        raise CaiError(describe(error), source=source, field=format_path([*path, key] if key else path) or None)


def _offending_key(error: jsonschema.ValidationError) -> str | None:
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})), key=str)
        return extra[0] if extra else None
    if error.validator == "required":
        return None
    return None


def describe(error: jsonschema.ValidationError) -> str:
    kind, instance, value = error.validator, error.instance, error.validator_value
    if kind == "additionalProperties":
        extra = sorted(set(instance) - set(error.schema.get("properties", {})), key=str)
        allowed = ", ".join(error.schema.get("properties", {}))
        return f"unknown key '{extra[0]}' (allowed: {allowed})"
    if kind == "required":
        missing = [k for k in value if k not in instance]
        return f"missing required key '{missing[0]}'"
    if kind == "type":
        expected = value if isinstance(value, str) else " or ".join(value)
        return f"must be {_article(expected)} {expected}, got {_json_type(instance)}"
    if kind in ("minLength", "pattern") and isinstance(instance, str) and not instance.strip():
        return "must not be empty"
    if kind == "pattern":
        return f"'{instance}' does not match the required form {value}"
    if kind == "exclusiveMinimum":
        return f"must be greater than {value}, got {instance}"
    if kind in ("minimum", "maximum"):
        return f"must be {'at least' if kind == 'minimum' else 'at most'} {value}, got {instance}"
    if kind == "minItems":
        return f"must have at least {value} item{'s' if value != 1 else ''}"
    if kind == "enum":
        return f"must be one of {', '.join(map(repr, value))}, got {instance!r}"
    if kind == "uniqueItems":
        return "items must be unique"
    if kind == "maxLength":
        return f"must be at most {value} characters"
    return error.message.splitlines()[0][:200]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
