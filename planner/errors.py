"""The two kinds of error a person can cause (STYLE.md lesson 3).

`InvalidRequest` — the request cannot be evaluated as asked (unknown name, bad size, degrees
that do not divide, malformed file). The CLI prints the one-line message and exits 2.

`Infeasible` — the request is valid but nothing fits. The CLI prints the message (which says
what would make it fit) and exits 3.

Internal invariants use `assert`; user input never does.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PlannerError(Exception):
    """Base for errors meant to be shown to people as one line."""

    exit_code = 1


class InvalidRequest(PlannerError):
    exit_code = 2


class Infeasible(PlannerError):
    """`details`: what `suggest --json` prints on exit 3 (the search's counts and the ways out)."""

    exit_code = 3

    def __init__(self, message: str, details: dict | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


def unknown_name(kind: str, name: str, known: Iterable[str], hint: str = "") -> InvalidRequest:
    """An error for an unknown preset name that suggests the closest known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name.lower(), known, n=3, cutoff=0.4)
    if not close:
        close = [k for k in known if name.lower() in k or k in name.lower()][:3]
    did_you_mean = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    extra = f" {hint}" if hint else ""
    return InvalidRequest(f"unknown {kind} {name!r}{did_you_mean}{extra}")


def read_json(path, what: str):
    """Parse a JSON file a person pointed us at; unreadable or malformed -> one-line InvalidRequest."""
    import json
    from pathlib import Path

    target = Path(path).expanduser()
    try:
        return json.loads(target.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidRequest(f"cannot read {what} {target}: {reason}") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} {target} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
