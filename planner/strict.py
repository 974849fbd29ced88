"""Strict reading of JSON into frozen dataclasses (Calculon-style: unknown or missing keys and wrong
types are one-line errors that name the key), so a hand-edited plan or preset never half-loads."""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, fields
from typing import Any, TypeVar

from planner.errors import InvalidRequest

T = TypeVar("T")


def strict_dataclass(cls: type[T], data: Any, what: str) -> T:
    """`cls(**data)` after checking keys and the type of every value against cls's annotations."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{what} must be a JSON object, got {_json_type(data)}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidRequest(f"{what}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    required = {n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise InvalidRequest(f"{what}: missing key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {name: check_type(value, hints[name], f"{what}.{name}") for name, value in data.items()}
    return cls(**values)


def check_type(value: Any, hint: Any, where: str) -> Any:
    """The value, converted where JSON cannot say it (lists to tuples), or a one-line error."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        return check_type(value, next(a for a in args if a is not type(None)), where)
    if hint is bool:
        if not isinstance(value, bool):
            raise InvalidRequest(f"{where} must be true or false, got {_json_type(value)} {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequest(f"{where} must be a whole number, got {_json_type(value)} {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidRequest(f"{where} must be a finite number, got {_json_type(value)} {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise InvalidRequest(f"{where} must be a string, got {_json_type(value)} {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise InvalidRequest(f"{where} must be a list, got {_json_type(value)}")
        item = args[0] if args else Any
        items = [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidRequest(f"{where} must be a JSON object, got {_json_type(value)}")
        item = args[1] if len(args) == 2 else Any
        return {k: check_type(v, item, f"{where}.{k}") for k, v in value.items()}
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)
