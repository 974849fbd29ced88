"""The SQLite store: schema and migrations, record_run, reading back, retries and concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from dataclasses import replace

import pytest
from tests.store_helpers import TINY_CONFIG, TINY_REQUEST, executor_record, without

from planner import api
from planner import runstore as store
from planner.errors import InvalidRequest
from planner.profile import load_profile
from planner.runrecord import from_record
from planner.runstore import (MIGRATIONS, SCHEMA_VERSION, Migration, connect, count_runs, insert_runs, iter_runs,
                              record_run)


def columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(runs)")}


def test_new_store_is_wal_at_the_current_schema_version(tmp_path):
    path = tmp_path / "runs.sqlite"
    with connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == MIGRATIONS[-1].version
        assert {"run_id", "config_json", "peak_reserved_bytes", "predicted_tokens_per_s_per_device",
                "calibration_version", "content_sha256"} <= columns(conn)
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_default_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PLANNER_STORE", str(tmp_path / "mine.sqlite"))
    assert store.default_store_path() == tmp_path / "mine.sqlite"
    monkeypatch.delenv("PLANNER_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert store.default_store_path() == tmp_path / "data" / "llm-planner" / "runs.sqlite"
    record_run(executor_record("r-default"))  # the default folder is created on first write
    assert count_runs() == 1


def test_migration_from_version_1_keeps_rows_and_backfills_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    run = from_record(executor_record("r-old"))
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in MIGRATIONS[0].statements:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    v1_columns = columns(conn)
    values = {k: v for k, v in store._columns(run, run.content_sha256()).items() if k in v1_columns}
    placeholders = ", ".join("?" * len(values))
    conn.execute(f"INSERT INTO runs ({', '.join(values)}) VALUES ({placeholders})", list(values.values()))
    conn.close()
    assert "predicted_tokens_per_s_per_device" not in v1_columns

    with connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        row = conn.execute("SELECT * FROM runs").fetchone()
        assert row["predicted_tokens_per_s_per_device"] == run.prediction["time"]["tokens_per_s_per_device"]
        assert row["predicted_peak_reserved_bytes"] == run.prediction["memory"]["peak_bytes"]
        assert row["calibration_version"] == run.calibration["version"]
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"runs_origin", "runs_hardware", "runs_model"} <= indexes
    stored = next(iter_runs(path))
    assert replace(stored, recorded_at=None) == run


def test_a_failing_migration_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    record_run(executor_record("r1"), path)
    broken = Migration(SCHEMA_VERSION + 1, "broken", ("CREATE TABLE half (x)", "ALTER TABLE nowhere ADD COLUMN y"))
    monkeypatch.setattr(store, "MIGRATIONS", MIGRATIONS + (broken,))
    monkeypatch.setattr(store, "SCHEMA_VERSION", broken.version)
    with pytest.raises(InvalidRequest, match="no such table"):
        with connect(path):
            pass
    monkeypatch.undo()
    with connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0
    assert count_runs(path) == 1


def test_stores_it_cannot_read_are_refused_in_one_line(tmp_path):
    newer = tmp_path / "newer.sqlite"
    sqlite3.connect(newer).execute("PRAGMA user_version = 99").connection.close()
    with pytest.raises(InvalidRequest, match="newer than this llm-planner"):
        with connect(newer):
            pass
    foreign = tmp_path / "foreign.sqlite"
    sqlite3.connect(foreign, isolation_level=None).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(InvalidRequest, match="not an llm-planner store"):
        with connect(foreign):
            pass
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a database at all" * 100)
    with pytest.raises(InvalidRequest, match="not a database"):
        with connect(text):
            pass
    with pytest.raises(InvalidRequest, match="does not exist"):
        with connect(tmp_path / "nowhere" / "runs.sqlite"):
            pass


def test_record_run_is_idempotent_on_run_id(tmp_path):
    path = tmp_path / "runs.sqlite"
    record = executor_record("r1")
    assert record_run(record, path) == "r1"
    assert record_run(record, path) == "r1"
    assert count_runs(path) == 1
    stored = next(iter_runs(path))
    assert replace(stored, recorded_at=None) == from_record(record, default_source="record_run")
    assert stored.measured.tokens_per_s_per_device == 750.0 and stored.usable
    assert stored.predicted("time", "tokens_per_s_per_device") == record["plan"]["prediction"]["time"][
        "tokens_per_s_per_device"]
    changed = executor_record("r1", tokens_per_s=1600.0)
    with pytest.raises(InvalidRequest, match="already stored .* other content"):
        record_run(changed, path)
    assert next(iter_runs(path)).measured.tokens_per_s == 1500.0


def test_a_record_without_prediction_gets_one_from_the_current_calibration(tmp_path):
    path = tmp_path / "runs.sqlite"
    record_run(without(executor_record("r1"), "plan", "prediction"), path)
    stored = next(iter_runs(path))
    assert stored.prediction == api.predict(TINY_REQUEST, TINY_CONFIG)
    profile = load_profile(None)
    assert stored.calibration["name"] == profile.name and stored.calibration["version"] == profile.data["version"]


@pytest.mark.parametrize("change,field", [
    (lambda r: r.pop("run_id"), "run_id"),
    (lambda r: r.update(status="crashed"), "status"),
    (lambda r: r.update(when="last tuesday"), "when"),
    (lambda r: r["plan"]["config"].update(tp=3), "plan.config"),
    (lambda r: r["plan"]["workload"].update(seq_len=0), "plan.workload"),
    (lambda r: r["measured"].update(tokens_per_s=-1.0), "measured.tokens_per_s"),
    (lambda r: r["measured"].update(tokens_per_s_per_device=1500.0), "measured.tokens_per_s_per_device"),
    (lambda r: r.update(format="llm-planner/plan@1"), "format"),
])
def test_bad_records_are_refused_naming_the_field(tmp_path, change, field):
    record = executor_record("bad")
    change(record)
    with pytest.raises(InvalidRequest) as caught:
        record_run(record, tmp_path / "runs.sqlite")
    assert str(caught.value).startswith(f"{field}:")
    assert count_runs(tmp_path / "runs.sqlite") == 0


def test_failed_and_oom_runs_are_kept(tmp_path):
    path = tmp_path / "runs.sqlite"
    record_run(executor_record("oom-1", status="oom"), path)
    run = next(iter_runs(path))
    assert run.status == "oom" and run.error == "CUDA out of memory" and not run.usable
    assert run.measured.tokens_per_s is None and run.prediction is not None


def test_reading_filters_and_a_missing_store(tmp_path):
    path = tmp_path / "runs.sqlite"
    assert list(iter_runs(path)) == [] and not path.exists()
    for i in range(3):
        record_run(executor_record(f"r{i}"), path)
    assert [r.run_id for r in iter_runs(path)] == ["r0", "r1", "r2"]
    assert len(list(iter_runs(path, origin="executor", hardware="cpu", model="llama-tiny"))) == 3
    assert list(iter_runs(path, origin="published")) == [] and list(iter_runs(path, hardware="a100-80gb")) == []
    assert len(list(iter_runs(path, origin=["published", "executor"]))) == 3
    with pytest.raises(InvalidRequest, match="origin must be one of"):
        list(iter_runs(path, origin="cluster"))


def test_a_transaction_is_all_or_nothing(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    runs = [from_record(executor_record(f"r{i}")) for i in range(4)]
    real = store._columns

    def failing(run, digest):
        if run.run_id == "r2":
            raise OSError("disk full")
        return real(run, digest)

    monkeypatch.setattr(store, "_columns", failing)
    with connect(path) as conn, pytest.raises(OSError):
        insert_runs(conn, runs)
    assert count_runs(path) == 0


def test_a_locked_store_is_waited_for_and_retried(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    record_run(executor_record("first"), path)
    monkeypatch.setattr(store, "BUSY_TIMEOUT_S", 0.02)  # SQLite gives up at once; our retries must carry it
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outcome: dict[str, object] = {}

    def write() -> None:
        try:
            outcome["id"] = record_run(executor_record("second"), path)
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            outcome["error"] = exc

    writer = threading.Thread(target=write)
    started = time.monotonic()
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive(), "the write must wait while another process holds the lock"
    holder.execute("COMMIT")
    holder.close()
    writer.join(timeout=30)
    assert outcome == {"id": "second"} and time.monotonic() - started >= 0.5
    assert count_runs(path) == 2


# -- several training processes finishing at once ------------------------------------------------

PROCESSES, RUNS_EACH, SHARED = 6, 40, 10


def _writer(path: str, worker: int, barrier, errors) -> None:
    barrier.wait()  # all start together, on a store that does not exist yet
    try:
        for i in range(RUNS_EACH):
            record_run(executor_record(f"w{worker}-{i}", tokens_per_s=1000.0 + i), path)
            if i < SHARED:  # every process also records the same runs: stored once
                record_run(executor_record(f"shared-{i}"), path)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errors.put(f"worker {worker}: {type(exc).__name__}: {exc}")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "runs.sqlite")
    context = multiprocessing.get_context("fork")
    barrier, errors = context.Barrier(PROCESSES), context.Queue()
    workers = [context.Process(target=_writer, args=(path, w, barrier, errors)) for w in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    problems = []
    while not errors.empty():
        problems.append(errors.get())
    assert problems == [] and [w.exitcode for w in workers] == [0] * PROCESSES
    ids = [run.run_id for run in iter_runs(path)]
    expected = {f"w{w}-{i}" for w in range(PROCESSES) for i in range(RUNS_EACH)}
    expected |= {f"shared-{i}" for i in range(SHARED)}
    assert len(ids) == len(expected) and set(ids) == expected
    tokens = {run.run_id: run.measured.tokens_per_s for run in iter_runs(path)}
    assert all(tokens[f"w{w}-{i}"] == 1000.0 + i for w in range(PROCESSES) for i in range(RUNS_EACH))
