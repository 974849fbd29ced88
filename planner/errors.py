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


def require_regular_file(path, what: str) -> None:
    """Refuse what is not a plain file (a FIFO, a device, a folder) before opening it: reading a FIFO
    waits forever for a writer. Missing files are left to the caller's open() and its message."""
    import stat
    from pathlib import Path

    target = Path(path).expanduser()
    try:
        mode = target.stat().st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
        raise InvalidRequest(f"{what} {target} is {kind}; give a regular file")


def parse_json(text: str, what: str):
    """json.loads with one-line errors for malformed, too-deeply nested and over-long-number JSON."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"{what} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file") from None
    except RecursionError:
        raise InvalidRequest(f"{what} is nested too deep to be a real document; fix the file") from None
    except ValueError as exc:  # e.g. an integer literal of more than 4300 digits
        raise InvalidRequest(f"{what} holds an unreadable value ({str(exc)[:120]}); fix the file") from None


def read_json(path, what: str):
    """Parse a JSON file a person pointed us at; unreadable or malformed -> one-line InvalidRequest."""
    from pathlib import Path

    target = Path(path).expanduser()
    require_regular_file(target, what)
    try:
        text = target.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidRequest(f"cannot read {what} {target}: {reason}") from None
    return parse_json(text, f"{what} {target}")
