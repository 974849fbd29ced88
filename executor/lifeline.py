"""Processes that die with the process that started them, and run folders that one run holds.

`planner train` starts torchrun, which starts one worker per device in a session of its own; a
`kill -9` of `planner train` (or of torchrun) would leave the workers training into a folder that
nobody records. Three guards, each cheap:

- a parent-death signal (Linux prctl(PR_SET_PDEATHSIG), man 2 prctl): the kernel sends SIGKILL to
  the child when the *thread* that forked it exits. The launcher sets it on torchrun (forked from
  the launcher's main thread), each worker on itself (torchrun's agent forks them from its main
  thread);
- a watchdog thread in every worker that polls os.getppid() and kills the worker when it changes
  (the portable fallback, and the guard against a parent that died before prctl took effect);
- an exclusive flock(2) on DIR/run.lock, held by the launcher for the life of the run, so that a
  second run or a `--resume` into a live run folder is refused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import sys
import threading
from pathlib import Path

from planner.errors import InvalidRequest

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL_S = 0.5
LOCK_NAME = "run.lock"
LAUNCHER_PID_ENV = "EXECUTOR_LAUNCHER_PID"  # set by the launcher for the workers of its torchrun


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send `sig` to this process when its parent thread exits; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def child_preexec() -> None:
    """preexec_fn for a child the launcher owns: its own process group (so that a terminal's
    signals reach it through the launcher only) and SIGKILL when the launcher dies."""
    os.setpgid(0, 0)
    set_parent_death_signal(signal.SIGKILL)


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent_pid: int, interval_s: float) -> None:
    event = threading.Event()
    while not event.wait(interval_s):
        if os.getppid() != parent_pid:
            _kill_self()


def bind_to_parent(interval_s: float = WATCH_INTERVAL_S) -> int:
    """Die when the parent dies: the parent-death signal where Linux offers it, and a watchdog
    thread everywhere. Returns the parent's pid."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent or _orphaned_from_launcher(parent):
        _kill_self()
    threading.Thread(target=_watch, args=(parent, interval_s), daemon=True, name="lifeline").start()
    return parent


def _orphaned_from_launcher(parent: int) -> bool:
    """Under `planner train` the parent (torchrun) is the launcher's child; a worker whose parent
    is not was reparented before its signal was armed (Linux /proc; elsewhere the watchdog)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    try:
        stat = Path(f"/proc/{parent}/stat").read_text()
    except OSError:
        return False
    return bool(launcher) and stat.rsplit(")", 1)[1].split()[1] != launcher  # field 4: ppid (man 5 proc)


def started_by_torchrun() -> bool:
    """torchrun's agent sets TORCHELASTIC_RUN_ID for its workers; a worker started alone (from a
    shell, `planner export`'s single-process line) belongs to no launcher."""
    return "TORCHELASTIC_RUN_ID" in os.environ


class RunLock:
    """An exclusive, non-blocking flock on DIR/run.lock; the kernel drops it when the holder dies."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, shown_as: str) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise InvalidRequest(f"{shown_as} is in use by a live `planner train` (pid {holder}); wait for it "
                                 "to end or stop it, or give a new --output") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
