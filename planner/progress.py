"""Progress bars on minute-long work (calibration fits, cross-validation, oracle traces, imports),
drawn by rich on stderr, and only there: stdout (and so `--json`) never sees them.

    with progress(len(folds), "cross-validation folds") as advance:
        for fold in folds:
            ...
            advance()

`advance(steps, description=...)` also rewrites the bar's text (training shows its loss there).

A bar is drawn only when stderr is a terminal, in the main process (a worker of a process pool
never draws; its parent advances the bar as results arrive), and unless bars are off (`with
bars(False)`: the commands' `--no-progress`). Otherwise `advance` does nothing. Rich itself would
print the finished bar once to a stderr that is not a terminal (rich.live.Live.refresh), hence the
check here. A bar opened while another is drawn becomes a second line of it, removed when done.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_STATE: dict[str, Any] = {"enabled": True, "active": None}


@contextmanager
def bars(enabled: bool) -> Iterator[None]:
    """Bars on or off for the work inside (off: `--no-progress`), as they were after."""
    before, _STATE["enabled"] = _STATE["enabled"], enabled
    try:
        yield
    finally:
        _STATE["enabled"] = before


def add_flag(parser: Any) -> None:
    """The `--no-progress` option of a command that has minute-long work."""
    parser.add_argument("--no-progress", action="store_true",
                        help="draw no progress bar (bars go to stderr, and only when it is a terminal)")


def _noop(steps: float = 1, **fields: Any) -> None:
    return None


def _should_draw(console: Any) -> bool:
    if not _STATE["enabled"] or multiprocessing.parent_process() is not None:
        return False
    if _STATE["active"] is not None:  # a bar is drawn already: join it
        return True
    if console is not None:  # tests and callers that bring their own console
        return bool(console.is_terminal)
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress(total: int | None, description: str, console: Any = None) -> Iterator[Callable[..., None]]:
    """A bar of `total` steps (None: a spinner with a count) on stderr; yields `advance(steps=1)`."""
    if not _should_draw(console):
        yield _noop
        return
    active = _STATE["active"]
    if active is not None:  # a bar inside a bar: one more line of the drawn one
        task = active.add_task(description, total=total)
        try:
            yield lambda steps=1, **fields: active.update(task, advance=steps, **fields)
        finally:
            active.remove_task(task)
        return
    bar = _new_progress(console)
    _STATE["active"] = bar
    try:
        with bar:
            task = bar.add_task(description, total=total)
            yield lambda steps=1, **fields: bar.update(task, advance=steps, **fields)
    finally:
        _STATE["active"] = None


def _new_progress(console: Any) -> Any:
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    # redirect_stdout=False: rich would otherwise route stdout's lines through its stderr console
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console or Console(stderr=True),
                    transient=True, redirect_stdout=False)
