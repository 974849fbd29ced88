"""The value checks shared by every reader of measured runs (planner/runrecord.py's records,
calibration/flat.py's CSV/JSONL rows): each turns one field's raw value into a typed one or raises
FieldError naming the field. Pure Python."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any

from planner.errors import InvalidRequest


class FieldError(InvalidRequest):
    """A bad value in one field of one run; the importer prefixes where the run came from."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def number(value: Any, name: str, minimum: float | None = 0.0, finite: bool = True,
           positive: bool = False) -> float | None:
    if blank(value):
        return None
    if isinstance(value, bool):
        raise FieldError(name, f"must be a number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise FieldError(name, f"must be a number, got {value!r}") from None
    if math.isnan(result) and not finite:
        return result
    if (finite and not math.isfinite(result)) or (minimum is not None and not result >= minimum):
        bound = f" >= {minimum:g}" if minimum is not None else ""
        raise FieldError(name, f"must be a finite number{bound}, got {value!r}")
    if positive and not result > 0:
        raise FieldError(name, f"must be a positive number, got {value!r}")
    return result


def whole(value: Any, name: str, minimum: int = 1) -> int | None:
    if blank(value):
        return None
    try:
        result = int(value) if isinstance(value, int) and not isinstance(value, bool) else int(str(value).strip())
    except ValueError:
        result = None
    if result is None or result < minimum:
        raise FieldError(name, f"must be a whole number >= {minimum}, got {value!r}")
    return result


def flag(value: Any, name: str) -> bool | None:
    if blank(value):
        return None
    if isinstance(value, bool):
        return value
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if str(value).strip().lower() not in words:
        raise FieldError(name, f"must be true or false, got {value!r}")
    return words[str(value).strip().lower()]


def text(value: Any, name: str) -> str:
    if blank(value) or not isinstance(value, str):
        raise FieldError(name, f"must be a non-empty string, got {value!r}")
    return value.strip()


def optional_text(value: Any, name: str) -> str | None:
    return None if blank(value) else text(value, name)


def choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise FieldError(name, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def json_object(value: Any, name: str) -> dict[str, Any] | None:
    """A JSON object given as such (JSON input) or as text (a CSV cell)."""
    if blank(value):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise FieldError(name, f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
        except (RecursionError, ValueError):  # nested 100,000 deep; an integer of over 4300 digits
            raise FieldError(name, "is nested too deep or holds an unreadable number") from None
    if not isinstance(value, dict):
        raise FieldError(name, "must be a JSON object")
    return value


def utc_timestamp(value: Any, name: str = "when") -> str | None:
    """ISO-8601 in UTC with a Z; a time without offset is taken as UTC."""
    if blank(value):
        return None
    if not isinstance(value, str):
        raise FieldError(name, f"must be an ISO-8601 time such as 2025-01-31T12:00:00Z, got {value!r}")
    raw = value.strip()
    try:
        moment = datetime.fromisoformat(raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw)
    except ValueError:
        raise FieldError(name, f"must be an ISO-8601 time such as 2025-01-31T12:00:00Z, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
