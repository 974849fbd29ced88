"""The training's progress bar: step count, ETA, loss, tokens/s and gradient norm, drawn by
planner/progress.py (rich, on stderr, only when it is a terminal; `planner train --no-progress`
turns it off).

`planner train` draws it in the launcher, which holds the terminal, from the rows rank 0 appends
to DIR/metrics.jsonl: the workers' stderr goes to the attempt's log file, so their own bars stay
silent there. A worker started by hand under torchrun, with a terminal on stderr, draws its own
(executor/report.py)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from planner.progress import progress


def describe(row: dict[str, Any]) -> str:
    """The bar's text after a step: `train  loss 2.3456  41,230 tokens/s  grad norm 1.02`."""
    text = f"train  loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tokens/s"
    if row.get("grad_norm") is not None:
        text += f"  grad norm {row['grad_norm']:.2f}"
    return text


class MetricsFollower:
    """The rows appended to a metrics.jsonl since the last look, of one attempt only (a resumed
    folder keeps an earlier attempt's rows; a line still being written waits for its newline)."""

    def __init__(self, path: Path, attempt: str | None) -> None:
        self.path, self.attempt, self.offset = path, attempt, 0

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:  # not written yet, or removed by a fresh start
            self.offset = 0
            return []
        if size < self.offset:  # rewritten shorter (a resume drops the rows after its checkpoint)
            self.offset = 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        rows = []
        for line in complete.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and (self.attempt is None or row.get("attempt") == self.attempt):
                rows.append(row)
        return rows


@contextmanager
def metrics_bar(path: Path, attempt: str | None, steps: int, console: Any = None) -> Iterator[Callable[[], None]]:
    """A bar of `steps` optimizer steps; yields `tick()`, which moves it to the newest row of the
    attempt (call it while the run goes; it is called once more at the end)."""
    follower, done = MetricsFollower(path, attempt), [0]
    with progress(steps, "train", console=console) as advance:
        def tick() -> None:
            for row in follower.new_rows():
                step = int(row.get("step", 0))
                if step > done[0] and "loss" in row and "tokens_per_s" in row:
                    advance(step - done[0], description=describe(row))
                    done[0] = step

        yield tick
        tick()
