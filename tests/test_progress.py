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


def _drawn(monkeypatch) -> list:
    """Bars drawn as on a terminal (into a string); returns the rich Progress objects made."""
    console, _ = _terminal()
    made, real = [], progress_module._new_progress

    def new(_console):
        made.append(real(console))
        return made[-1]

    monkeypatch.setattr(progress_module, "_new_progress", new)
    monkeypatch.setattr(sys, "stderr", _TerminalStderr())
    return made


def _cases_of_three_sources():
    from dataclasses import replace

    from calibration.fitting import predictions, prepare
    from planner.profile import load_profile
    from tests.test_calibration_fit import synthetic_runs

    runs = [c for c in synthetic_runs() if c.hardware == "h100-sxm-80gb" and c.workload.seq_len <= 8192]
    for item, tokens_per_s in zip(prepare(runs, load_profile()), predictions(prepare(runs, load_profile()),
                                                                            load_profile().data)[0]):
        item.case.tokens_per_s_per_device = 0.9 * float(tokens_per_s)
    return [replace(c, source=f"paper {i % 3}") for i, c in enumerate(runs)]


def test_the_fit_counts_its_evaluations_on_a_spinner(monkeypatch):
    from calibration.fitting import fit_profile
    from planner.profile import load_profile

    made = _drawn(monkeypatch)
    fit_profile(_cases_of_three_sources()[:2], load_profile())
    (task,) = made[0].tasks
    assert task.total is None and task.completed > 0 and "fitting" in task.description


def test_cross_validation_advances_once_per_fold_in_the_parent(monkeypatch):
    """With --jobs the folds end in worker processes, which draw nothing; the parent advances the
    bar as each result arrives, and the rows come back in source order however the folds ended."""
    from calibration.crossval import leave_one_source_out
    from planner.profile import load_profile

    cases = _cases_of_three_sources()
    made = _drawn(monkeypatch)
    rows = leave_one_source_out(cases, load_profile(), jobs=2)
    assert len(made) == 1  # one bar, drawn by this process
    (task,) = made[0].tasks
    assert (task.description, task.completed, task.total) == ("cross-validation folds", 3, 3)
    assert [(r["source"], r["id"]) for r in rows] == sorted((c.publication, c.id) for c in cases)
