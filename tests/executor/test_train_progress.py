"""The training's progress bar (executor/train_progress.py): the launcher follows rank 0's rows of
metrics.jsonl (this attempt's only, whole lines only) and draws steps, loss and tokens/s through
planner/progress.py, on a terminal only; `planner train` prints the plan's predicted tokens/s beside
the measured one at the end."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import threading

import pytest

from rich.console import Console

from executor.train_progress import MetricsFollower, describe, metrics_bar
from planner import progress as progress_module
from tests.executor.conftest import ALPACA, ROOT, make_plan


def _row(step: int, attempt: str = "a1", loss: float = 2.5) -> str:
    return json.dumps({"step": step, "loss": loss, "tokens_per_s": 1234.5, "grad_norm": 1.5, "attempt": attempt})


def test_follower_reads_whole_lines_of_its_attempt_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path, "a1")
    assert follower.new_rows() == []  # no file yet
    path.write_text(_row(1, "old") + "\n" + _row(1) + "\n" + _row(2)[:10])  # a line being written
    assert [r["step"] for r in follower.new_rows()] == [1]
    with open(path, "a") as f:
        f.write(_row(2)[10:] + "\n")
    assert [r["step"] for r in follower.new_rows()] == [2]
    assert follower.new_rows() == []
    path.write_text(_row(3) + "\n")  # rewritten shorter (a resume): read from the start again
    assert [r["step"] for r in follower.new_rows()] == [3]


def test_bar_follows_the_rows_with_loss_and_tokens_per_s(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = io.StringIO()
    console = Console(force_terminal=True, file=sink, width=120)
    with metrics_bar(path, "a1", 10, console=console) as tick:
        path.write_text(_row(1) + "\n" + _row(2, loss=2.25) + "\n")
        tick()
        task = progress_module._STATE["active"].tasks[0]
        assert task.completed == 2 and task.total == 10
        assert task.description == describe({"loss": 2.25, "tokens_per_s": 1234.5, "grad_norm": 1.5})
        with open(path, "a") as f:
            f.write(_row(5) + "\n")  # rows are per step; a resumed run starts further on
    assert task.completed == 5  # the last rows are read when the run ends
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", sink.getvalue())  # without the terminal's escape codes
    assert "train  loss 2.5000  1,234 tokens/s  grad norm 1.50" in drawn and "5/10" in drawn


def _train_cli(plan, output, stderr) -> subprocess.CompletedProcess:
    """`planner train` as a person types it (no --no-progress), stderr where the test says."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLANNER_STORE": str(output.parent / "runs.sqlite")}
    return subprocess.run([sys.executable, "-m", "planner.cli", "train", "--plan", str(plan), "--data", str(ALPACA),
                           "--steps", "3", "--output", str(output), "--no-save"],
                          stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env, timeout=600, check=True)


def _read_all(fd: int, chunks: list[bytes]) -> None:
    """Drain a pty as it is written (a full one would block the writer)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the other end closed
            return
        if not chunk:
            return
        chunks.append(chunk)


def test_the_bar_is_drawn_on_a_terminal_and_predicted_tokens_per_s_printed_beside_the_measured(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    leader, follower = pty.openpty()
    chunks: list[bytes] = []
    reader = threading.Thread(target=_read_all, args=(leader, chunks), daemon=True)
    reader.start()
    try:
        proc = _train_cli(plan, tmp_path / "run", follower)
    finally:
        os.close(follower)
    reader.join(timeout=10)
    os.close(leader)
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert re.search(r"train  loss \d+\.\d{4}  [\d,]+ tokens/s", drawn), drawn[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    predicted = json.loads(plan.read_text())["prediction"]["time"]["tokens_per_s"]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("tokens/s (job)"))
    numbers = [float(n.replace(",", "")) for n in re.findall(r"[\d,.]+", line.split(")", 1)[1])]
    assert numbers[0] == round(predicted) and numbers[1] == round(summary["measured"]["tokens_per_s"])
    assert "train  loss" not in proc.stdout  # the bar never reaches stdout


@pytest.mark.slow  # ~16 s: a whole training run
def test_no_bar_when_stderr_is_not_a_terminal(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    proc = _train_cli(plan, tmp_path / "run", subprocess.PIPE)
    assert "train  loss" not in proc.stderr and "train  loss" not in proc.stdout
    assert (tmp_path / "run" / "summary.json").exists()
