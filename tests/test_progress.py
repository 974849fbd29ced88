"""planner/progress.py: bars on stderr only when it is a terminal, and never on stdout."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from rich.console import Console

from planner import progress as progress_module
from planner.cli import main
from planner.progress import progress

SHIPPED_CASES = Path(__file__).resolve().parents[1] / "calibration" / "data" / "public_cases.json"


def _terminal() -> tuple[Console, io.StringIO]:
    sink = io.StringIO()
    return Console(force_terminal=True, file=sink, width=100), sink


def test_silent_when_stderr_is_not_a_terminal(capsys):
    with progress(3, "folds") as advance:
        for _ in range(3):
            advance()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_draws_on_a_terminal_and_counts_the_steps():
    console, sink = _terminal()
    with progress(4, "cross-validation folds", console=console) as advance:
        advance()
        advance(2)
        task = progress_module._STATE["active"].tasks[0]
        assert task.completed == 3 and task.total == 4
    assert "cross-validation folds" in sink.getvalue()
    assert progress_module._STATE["active"] is None


def test_a_bar_inside_a_bar_is_a_second_line_removed_when_done():
    console, sink = _terminal()
    with progress(2, "outer", console=console) as outer:
        with progress(None, "inner") as inner:  # no console of its own: it joins the drawn bar
            inner()
            assert [t.description for t in progress_module._STATE["active"].tasks] == ["outer", "inner"]
        assert [t.description for t in progress_module._STATE["active"].tasks] == ["outer"]
        outer()


def test_no_progress_turns_a_terminal_bar_off():
    console, sink = _terminal()
    with progress_module.bars(False), progress(2, "folds", console=console) as advance:
        advance()
    assert sink.getvalue() == ""
    assert progress_module._STATE["enabled"]  # as it was after


class _TerminalStderr(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("extra, drawn", [((), True), (("--no-progress",), False)])
def test_runs_import_json_is_the_same_with_a_bar_on_a_terminal_stderr(tmp_path, capsys, monkeypatch, extra, drawn):
    """--json stdout is byte for byte the same whether stderr is a terminal (bar drawn) or not."""
    real = progress_module._new_progress
    outputs = []
    for terminal in (False, True):
        store = tmp_path / "runs.sqlite"
        store.unlink(missing_ok=True)
        console, sink = _terminal()
        monkeypatch.setattr(progress_module, "_new_progress", lambda c: real(console))
        if terminal:
            monkeypatch.setattr(sys, "stderr", _TerminalStderr())
        assert main(["runs", "import", str(SHIPPED_CASES), "--store", str(store), "--json", *extra]) == 0
        outputs.append(capsys.readouterr().out)
        assert ("importing runs" in sink.getvalue()) == (terminal and drawn)
    assert outputs[0] == outputs[1]
    assert json.loads(outputs[0])["inserted"] > 0
