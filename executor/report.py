"""What rank 0 shows and writes per step: DIR/metrics.jsonl (always), TensorBoard event files in
DIR/tensorboard (torch.utils.tensorboard, when the `tensorboard` package is installed), and a
progress bar (executor/train_progress.py: steps, ETA, loss, tokens/s, gradient norm) on stderr when
it is a terminal: under `planner train` it is the log file, and the launcher draws the bar instead."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from executor.measure import MetricsLog
from executor.train_progress import describe
from planner.progress import progress as progress_bar

SCALARS = {"loss": "train/loss", "eval_loss": "eval/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
           "tokens_per_s": "perf/tokens_per_s", "step_s": "perf/step_s"}


class TensorBoard:
    """A SummaryWriter, or nothing (with one note) when tensorboard is not installed."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer, self.note = None, None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.note = ("tensorboard is not installed: no event files (pip install tensorboard); "
                         "metrics.jsonl has every value")
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class StepReport:
    """metrics.jsonl + TensorBoard + progress bar; only rank 0 writes or shows anything."""

    def __init__(self, output: Path, steps: int, is_rank0: bool, progress: bool, tensorboard: bool) -> None:
        self.metrics = MetricsLog(output / "metrics.jsonl", enabled=is_rank0)
        self.board = TensorBoard(output / "tensorboard", enabled=is_rank0 and tensorboard)
        if self.board.note:
            print(f"note: {self.board.note}")
        self.steps, self.show = steps, is_rank0 and progress
        self.bar = contextlib.ExitStack()
        self.advance = None

    def start(self, first_step: int) -> None:
        if self.show:
            self.advance = self.bar.enter_context(progress_bar(self.steps, "train"))
            if first_step:
                self.advance(first_step)

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.write(record)
        self.board.write(record)
        if self.advance is not None:
            self.advance(1, description=describe(record))

    def close(self) -> None:
        self.bar.close()
        self.board.close()
