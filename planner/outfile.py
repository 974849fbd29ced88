"""Files the planner writes where a person said (--save-plan, export -o, runs export --output,
calibrate --out): refused with one line when the path is a folder or its folder is missing, and
written atomically (a temporary file, then a rename) so that a reader never sees half a file and a
FIFO at the path is replaced instead of blocking the write."""

from __future__ import annotations

from pathlib import Path

from planner.errors import InvalidRequest


def output_path(path: str | Path, what: str) -> Path:
    """The path to write `what` to, checked before any work is done."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise InvalidRequest(f"cannot write the {what} to {path}: it is a folder; give a file path")
    if not target.parent.is_dir():
        why = "is a file, not a folder" if target.parent.exists() else "does not exist"
        raise InvalidRequest(f"cannot write the {what} to {path}: {target.parent} {why}")
    return target


def write_text(path: str | Path, text: str, what: str) -> Path:
    target = output_path(path, what)
    partial = target.with_name(target.name + ".tmp")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    except OSError as exc:  # no space left, read-only, permission
        partial.unlink(missing_ok=True)
        raise InvalidRequest(f"cannot write the {what} to {path}: {exc.strerror or exc}") from None
    return target
