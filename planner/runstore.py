"""The measured-run store: an embedded SQLite database in one file (stdlib sqlite3, no server).
The executor records its runs here and calibration reads them back, so it lives in planner, below
both (with the record format, runrecord.py).

Path: --store, else $PLANNER_STORE, else ${XDG_DATA_HOME:-~/.local/share}/llm-planner/runs.sqlite.

Several training processes may finish at once, so:
  * WAL journal: readers never block the writer and the writer never blocks readers
    (https://sqlite.org/wal.html);
  * every write is one short `BEGIN IMMEDIATE` transaction: it takes the write lock up front, so
    two writers never deadlock upgrading a read lock (https://sqlite.org/lang_transaction.html);
  * a busy timeout lets SQLite wait for the lock, and a write that still meets SQLITE_BUSY /
    SQLITE_LOCKED is retried with jittered backoff until WRITE_DEADLINE_S;
  * synchronous=FULL: a committed run survives a power cut (runs cost GPU-hours).

Schema version: `PRAGMA user_version`. MIGRATIONS are applied in order, each together with its
version bump in one transaction, so a store is always at a whole version.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.runrecord import ORIGINS, Measured, Run, from_record, now_utc, with_prediction
from planner.specs import Hardware, ModelSpec, Workload

STORE_ENV = "PLANNER_STORE"
BUSY_TIMEOUT_S = 10.0  # SQLite's own wait for a lock before it answers SQLITE_BUSY
WRITE_DEADLINE_S = 120.0  # then our retries, up to this long in all
SQLITE_BUSY, SQLITE_LOCKED = 5, 6
T = TypeVar("T")


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "runs: one row per measured run, typed parts as JSON", (
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            origin TEXT NOT NULL CHECK (origin IN ('executor', 'published', 'user')),
            status TEXT NOT NULL CHECK (status IN ('finished', 'failed', 'oom')),
            measured_at TEXT,
            recorded_at TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT '',
            error TEXT,
            excluded TEXT,
            model_name TEXT NOT NULL,
            hardware_name TEXT NOT NULL,
            num_devices INTEGER,
            devices_per_node INTEGER,
            model_json TEXT,
            hardware_json TEXT,
            workload_json TEXT,
            config_json TEXT,
            steps INTEGER,
            tokens_per_s REAL,
            tokens_per_s_per_device REAL,
            step_s REAL,
            peak_allocated_bytes REAL,
            peak_reserved_bytes REAL,
            loss_first REAL,
            loss_last REAL,
            prediction_json TEXT,
            calibration_json TEXT,
            environment_json TEXT NOT NULL DEFAULT '{}',
            details_json TEXT NOT NULL DEFAULT '{}',
            input_json TEXT,
            content_sha256 TEXT NOT NULL
        )""",
    )),
    Migration(2, "prediction and calibration columns for SQL queries (backfilled); indexes for list filters", (
        "ALTER TABLE runs ADD COLUMN calibration_name TEXT",
        "ALTER TABLE runs ADD COLUMN calibration_version TEXT",
        "ALTER TABLE runs ADD COLUMN predicted_tokens_per_s_per_device REAL",
        "ALTER TABLE runs ADD COLUMN predicted_step_s REAL",
        "ALTER TABLE runs ADD COLUMN predicted_peak_reserved_bytes REAL",
        "ALTER TABLE runs ADD COLUMN predicted_peak_allocated_bytes REAL",
        """UPDATE runs SET
            calibration_name = json_extract(calibration_json, '$.name'),
            calibration_version = json_extract(calibration_json, '$.version'),
            predicted_tokens_per_s_per_device = json_extract(prediction_json, '$.time.tokens_per_s_per_device'),
            predicted_step_s = json_extract(prediction_json, '$.time.step_s'),
            predicted_peak_reserved_bytes = json_extract(prediction_json, '$.memory.peak_bytes'),
            predicted_peak_allocated_bytes = json_extract(prediction_json, '$.memory.allocated_peak_bytes')
           WHERE prediction_json IS NOT NULL OR calibration_json IS NOT NULL""",
        "CREATE INDEX runs_origin ON runs (origin)",
        "CREATE INDEX runs_hardware ON runs (hardware_name)",
        "CREATE INDEX runs_model ON runs (model_name)",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
MEASURED_COLUMNS = tuple(f.name for f in fields(Measured))


def default_store_path() -> Path:
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or "~/.local/share"
    return Path(data_home).expanduser() / "llm-planner" / "runs.sqlite"


def store_path(db_path: str | Path | None = None) -> Path:
    return Path(db_path).expanduser() if db_path else default_store_path()


@contextmanager
def connect(db_path: str | Path | None = None, create: bool = True) -> Iterator[sqlite3.Connection | None]:
    """An open, migrated store; None when `create` is false and there is no store yet."""
    path = store_path(db_path)
    if not path.exists():
        if not create:
            yield None
            return
        if db_path is None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # e.g. $PLANNER_STORE below a file
                raise InvalidRequest(f"cannot create store {path}: {exc.strerror or exc} at {path.parent}; set "
                                     f"${STORE_ENV} or --store to a path in a folder") from None
        elif not path.parent.is_dir():
            raise InvalidRequest(f"cannot create store {path}: folder {path.parent} does not exist; create it or "
                                 "give another --store")
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as exc:
        raise InvalidRequest(f"cannot open store {path}: {exc}; give another --store") from None
    try:
        conn.row_factory = sqlite3.Row
        _retrying(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), path)
        conn.execute("PRAGMA synchronous=FULL")
        migrate(conn, path)
        yield conn
    except sqlite3.DatabaseError as exc:
        raise InvalidRequest(f"store {path}: {exc}; give an llm-planner store with --store") from None
    finally:
        conn.close()


def migrate(conn: sqlite3.Connection, path: Path | str = "store") -> int:
    """Bring the store to SCHEMA_VERSION; returns the version it was at."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found == SCHEMA_VERSION:
        return found

    def work(c: sqlite3.Connection) -> int:
        version = c.execute("PRAGMA user_version").fetchone()[0]  # again, now under the write lock
        if version > SCHEMA_VERSION:
            raise InvalidRequest(f"store {path} has schema version {version}, newer than this llm-planner's "
                                 f"{SCHEMA_VERSION}; upgrade llm-planner")
        if version == 0 and c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise InvalidRequest(f"{path} is an SQLite database but not an llm-planner store; give another --store")
        for migration in MIGRATIONS:
            if migration.version > version:
                for statement in migration.statements:
                    c.execute(statement)
                c.execute(f"PRAGMA user_version = {int(migration.version)}")
        return version

    return transaction(conn, work, path)


def transaction(conn: sqlite3.Connection, work: Callable[[sqlite3.Connection], T], path: Path | str = "store") -> T:
    """Run `work` in one BEGIN IMMEDIATE transaction; all of it or nothing, retried while busy."""

    def attempt() -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    return _retrying(attempt, path)


def _retrying(action: Callable[[], T], path: Path | str) -> T:
    deadline, delay_s = time.monotonic() + WRITE_DEADLINE_S, 0.005
    while True:
        try:
            return action()
        except sqlite3.OperationalError as exc:
            if not _busy(exc):
                raise
            if time.monotonic() > deadline:
                raise InvalidRequest(f"store {path} stayed locked for {WRITE_DEADLINE_S:.0f} s ({exc}); "
                                     "is a process stuck holding it?") from None
        time.sleep(delay_s * (1 + random.random()))
        delay_s = min(delay_s * 2, 0.5)


def _busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11: the extended result code
    if code is not None:
        return code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


# -- writing ------------------------------------------------------------------------------------

INSERTED, UNCHANGED, REPLACED, CONFLICT, NOT_WRITTEN = "inserted", "unchanged", "replaced", "conflict", "not written"


class _Conflict(Exception):
    def __init__(self, outcomes: list[str]) -> None:
        self.outcomes = outcomes


def insert_runs(conn: sqlite3.Connection, runs: Sequence[Run], replace: bool = False, atomic: bool = False,
                batch: int = 200) -> list[str]:
    """Store runs; one outcome per run. A run_id already stored with the same content is left as it is
    (idempotent); with other content it is a conflict unless `replace`. `atomic`: all runs in one
    transaction, and nothing written if any conflicts. Otherwise short transactions of `batch` runs."""
    if atomic:
        def all_or_nothing(c: sqlite3.Connection) -> list[str]:
            outcomes = [_insert_one(c, run, replace) for run in runs]
            if CONFLICT in outcomes:
                raise _Conflict([o if o == CONFLICT else NOT_WRITTEN for o in outcomes])
            return outcomes

        try:
            return transaction(conn, all_or_nothing)
        except _Conflict as conflict:
            return conflict.outcomes
    outcomes: list[str] = []
    for start in range(0, len(runs), batch):
        outcomes += transaction(conn, lambda c, chunk=runs[start:start + batch]: [
            _insert_one(c, run, replace) for run in chunk])
    return outcomes


def _insert_one(conn: sqlite3.Connection, run: Run, replace: bool) -> str:
    digest = run.content_sha256()
    found = conn.execute("SELECT content_sha256 FROM runs WHERE run_id = ?", (run.run_id,)).fetchone()
    if found is not None and found[0] == digest:
        return UNCHANGED
    if found is not None and not replace:
        return CONFLICT
    if found is not None:
        conn.execute("DELETE FROM runs WHERE run_id = ?", (run.run_id,))
    values = _columns(run, digest)
    conn.execute(f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join(':' + k for k in values)})", values)
    return INSERTED if found is None else REPLACED


def _columns(run: Run, digest: str) -> dict[str, Any]:
    def as_json(value: Any) -> str | None:
        return None if value is None else json.dumps(value, sort_keys=True)

    calibration = run.calibration or {}
    return {
        "run_id": run.run_id, "origin": run.origin, "status": run.status, "measured_at": run.when,
        "recorded_at": now_utc(), "source": run.source, "error": run.error, "excluded": run.excluded,
        "model_name": run.model_name, "hardware_name": run.hardware_name, "num_devices": run.num_devices,
        "devices_per_node": run.devices_per_node,
        "model_json": as_json(run.spec.to_dict() if run.spec else None),
        "hardware_json": as_json(run.hardware.to_dict() if run.hardware else None),
        "workload_json": as_json(run.workload.to_dict() if run.workload else None),
        "config_json": as_json(run.config.to_dict() if run.config else None),
        **run.measured.to_dict(),
        "prediction_json": as_json(run.prediction), "calibration_json": as_json(run.calibration),
        "environment_json": as_json(run.environment), "details_json": as_json(run.details),
        "input_json": as_json(run.input), "content_sha256": digest,
        "calibration_name": calibration.get("name"), "calibration_version": calibration.get("version"),
        "predicted_tokens_per_s_per_device": run.predicted("time", "tokens_per_s_per_device"),
        "predicted_step_s": run.predicted("time", "step_s"),
        "predicted_peak_reserved_bytes": run.predicted("memory", "peak_bytes"),
        "predicted_peak_allocated_bytes": run.predicted("memory", "allocated_peak_bytes"),
    }


def record_run(record: dict[str, Any], db_path: str | Path | None = None) -> str:
    """Store one run record (format llm-planner/run@1, what the executor writes as DIR/summary.json);
    returns its run_id. Calling it again with the same record changes nothing. Raises InvalidRequest
    for a malformed record or a run_id already stored with other content."""
    run = with_prediction(from_record(record, default_source="record_run"))
    with connect(db_path) as conn:
        outcome = insert_runs(conn, [run])[0]
    if outcome == CONFLICT:
        raise InvalidRequest(f"run_id {run.run_id!r} is already stored in {store_path(db_path)} with other "
                             "content; give the new run its own run_id")
    return run.run_id


# -- reading ------------------------------------------------------------------------------------

def iter_runs(db_path: str | Path | None = None, origin: str | Sequence[str] | None = None,
              hardware: str | Sequence[str] | None = None, model: str | Sequence[str] | None = None) -> Iterator[Run]:
    """Stored runs in the order they were stored, optionally only some origins / hardware / models."""
    clauses, params = [], []
    for column, wanted in (("origin", origin), ("hardware_name", hardware), ("model_name", model)):
        if wanted is None:
            continue
        values = [wanted] if isinstance(wanted, str) else list(wanted)
        if column == "origin" and set(values) - set(ORIGINS):
            raise InvalidRequest(f"origin must be one of {', '.join(ORIGINS)}; got {', '.join(values)}")
        clauses.append(f"{column} IN ({', '.join('?' * len(values))})")
        params += values
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    with connect(db_path, create=False) as conn:
        rows = [] if conn is None else conn.execute(f"SELECT * FROM runs{where} ORDER BY rowid", params).fetchall()
    for row in rows:
        yield _run_from_row(row)


def count_runs(db_path: str | Path | None = None) -> int:
    with connect(db_path, create=False) as conn:
        return 0 if conn is None else conn.execute("SELECT count(*) FROM runs").fetchone()[0]


def _run_from_row(row: sqlite3.Row) -> Run:
    def parsed(column: str) -> Any:
        return None if row[column] is None else json.loads(row[column])

    def typed(column: str, reader: Callable[[dict[str, Any]], Any]) -> Any:
        value = parsed(column)
        return None if value is None else reader(value)

    return Run(run_id=row["run_id"], origin=row["origin"], status=row["status"], model_name=row["model_name"],
               hardware_name=row["hardware_name"], num_devices=row["num_devices"],
               devices_per_node=row["devices_per_node"], spec=typed("model_json", ModelSpec.from_dict),
               hardware=typed("hardware_json", Hardware.from_dict), workload=typed("workload_json", Workload.from_dict),
               config=typed("config_json", ParallelConfig.from_dict),
               measured=Measured(**{name: row[name] for name in MEASURED_COLUMNS}), when=row["measured_at"],
               source=row["source"], error=row["error"], excluded=row["excluded"],
               prediction=parsed("prediction_json"), calibration=parsed("calibration_json"),
               environment=parsed("environment_json") or {}, details=parsed("details_json") or {},
               input=parsed("input_json"), recorded_at=row["recorded_at"])
