"""The launcher owns its workers and its run folder (issue 18): a SIGKILL of `planner train`'s
process group, or of torchrun alone, leaves no worker training; a live run folder refuses a second
run; a damaged newest checkpoint gives way to the one before; a full disk is one line; failed
attempts are recorded with their own measurements only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from executor.lifeline import RunLock
from planner.errors import InvalidRequest
from tests.executor.conftest import ALPACA, ROOT, losses, make_plan, train
from tests.executor.test_train_cli import _wait_for_step

CHECKPOINTS = ("--checkpoint-every", "4", "--no-save")


def _start(plan: Path, run: Path, steps: int, *extra: str) -> subprocess.Popen:
    """`planner train` in a process group of its own, as a terminal would start it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PLANNER_STORE": str(run.parent / "runs.sqlite")}
    cmd = [sys.executable, "-m", "planner.cli", "train", "--plan", str(plan), "--data", str(ALPACA), "--steps",
           str(steps), "--output", str(run), "--lr", "1e-3", "--no-progress", *CHECKPOINTS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _processes_naming(folder: Path) -> list[int]:
    """Every live process whose command line names the run folder (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _assert_nothing_runs_on(run: Path, grace_s: float = 3.0) -> None:
    """No process of the run is left, and metrics.jsonl does not grow after the kill."""
    size = (run / "metrics.jsonl").stat().st_size
    time.sleep(grace_s)
    assert _processes_naming(run) == []
    assert (run / "metrics.jsonl").stat().st_size == size


@pytest.mark.slow  # ~70 s: three runs of 2 processes
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_sigkill_stops_every_worker_and_resume_is_bit_identical(tmp_path, single_process_losses):
    reference = single_process_losses  # same plan, data, seed and lr, never interrupted
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    run = tmp_path / "run"
    started = time.monotonic()
    proc = _start(plan, run, 20)
    try:
        _wait_for_step(run / "metrics.jsonl", 5, proc)
        below = [pid for pid in _processes_naming(run) if pid != proc.pid]  # torchrun and its worker
        _signal_all(below, signal.SIGSTOP)  # held still while a second run tries the folder
        second = train(plan, run, 20, *CHECKPOINTS, "--resume", check=False)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert "in use by a live `planner train`" in second.stderr
        assert proc.poll() is None, "the run ended before it could be killed"
        _signal_all(below, signal.SIGCONT)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher only: torchrun has a group of its own
        proc.wait()
    _assert_nothing_runs_on(run)
    killed_at = max(losses(run))

    # a resume whose torchrun is killed: the workers stop, the launcher records a failed attempt
    # with this attempt's steps only (not the killed run's)
    proc = _start(plan, run, 20, "--resume")
    try:
        _wait_for_step(run / "metrics.jsonl", killed_at + 2, proc)
        torchrun = next(pid for pid in _children(proc.pid))
        os.kill(torchrun, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1
    _assert_nothing_runs_on(run, grace_s=1.0)
    record = json.loads((run / "summary.json").read_text())
    assert record["status"] == "failed"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    own = [r for r in rows if r["attempt"] == rows[-1]["attempt"]]
    assert 2 <= record["measured"]["steps"] == len(own) < len(rows)

    train(plan, run, 20, *CHECKPOINTS, "--resume")
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 21))
    assert all(resumed[step] == reference[step] for step in range(1, 21)), (resumed, reference)
    print(f"kill, refuse, kill torchrun, resume: {time.monotonic() - started:.0f} s")


@pytest.mark.slow  # ~70 s: three runs
def test_damaged_newest_checkpoint_then_full_disk(tmp_path):
    """A truncated shard of the newest checkpoint: --resume warns once and resumes from the one
    before, with the uninterrupted run's losses. Then the disk fills while checkpointing: exit 2,
    one line, and the run recorded as failed with its own steps only. (A constant learning rate:
    the runs here end at different --steps, which a decaying schedule would follow.)"""
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    run = tmp_path / "run"
    every_2 = ("--checkpoint-every", "2", "--no-save", "--lr-schedule", "constant", "--warmup-steps", "0")
    train(plan, run, 8, *every_2)  # checkpoints kept: steps 4 and 6
    uninterrupted = losses(run)
    shard = next((run / "checkpoints" / "step-00000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = train(plan, run, 12, *every_2, "--resume")
    warnings = [line for line in proc.stdout.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "skipping checkpoint step-00000006" in warnings[0], proc.stdout
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 13))
    assert all(resumed[step] == uninterrupted[step] for step in range(5, 9))  # steps 5-8 again, from step 4

    os.environ["EXECUTOR_INJECT_ENOSPC"] = "14"
    try:
        full = train(plan, run, 16, *every_2, "--resume", check=False)
    finally:
        del os.environ["EXECUTOR_INJECT_ENOSPC"]
    assert full.returncode == 2 and full.stderr.count("\n") == 1, full.stderr
    assert "disk is full" in full.stderr and "internal error" not in full.stderr
    record = json.loads((run / "summary.json").read_text())
    assert record["status"] == "failed" and "disk is full" in record["error"]
    assert record["measured"]["steps"] == 4  # steps 11..14 of this attempt, resumed from step 10
    from planner.runstore import iter_runs

    assert [r.status for r in iter_runs(tmp_path / "runs.sqlite")].count("failed") == 1


@pytest.mark.slow  # ~30 s: a training run stopped by a signal (the kill/resume runs beside it are slow too)
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_sigterm_stops_the_run_and_records_it(tmp_path):
    plan = make_plan(tmp_path / "plan.json", 1, micro_batch_size=4)
    run = tmp_path / "run"
    proc = _start(plan, run, 400)
    try:
        _wait_for_step(run / "metrics.jsonl", 3, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM and err.count("\n") == 1 and "--resume" in err, err
    _assert_nothing_runs_on(run, grace_s=1.0)
    record = json.loads((run / "summary.json").read_text())
    assert record["status"] == "failed" and record["error"].startswith("killed: stopped by SIGTERM")
    assert record["measured"]["steps"] == len(losses(run)) < 400


def test_a_run_folder_has_one_holder(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire("run")
    with pytest.raises(InvalidRequest, match=f"pid {os.getpid()}"):
        second.acquire("run")
    first.release()
    second.acquire("run")
    second.release()


WORKER = """
import sys, time
from executor import lifeline
if sys.argv[1] == "watchdog-only":
    lifeline.set_parent_death_signal = lambda *args: False
lifeline.bind_to_parent(0.1)
print("bound", flush=True)
time.sleep(120)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "bound\\n"
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["pdeathsig-and-watchdog", "watchdog-only"])
def test_a_bound_child_dies_with_its_parent(mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, WORKER, mode], stdout=subprocess.PIPE, text=True,
                              env=env, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
