"""Speed of the measured-run store (run: .venv/bin/python -m pytest benchmarks/test_store_speed.py).

What matters: record_run at the end of a training run takes milliseconds (it opens the store,
writes one short transaction with fsync, closes); importing the published cases includes one
planner prediction per usable case; reading runs for fitting costs well under a millisecond a run
(mostly decoding the JSON parts).
"""

import itertools

from calibration.cases import SHIPPED_CASES
from calibration.ingest import import_paths
from planner import api
from planner.plan import ParallelConfig
from planner.runrecord import from_record, new_record
from planner.runstore import connect, count_runs, insert_runs, iter_runs, record_run

REQUEST = api.Request(model="llama-tiny", gpu="cpu", gpus=2, seq_len=128, global_batch=8, precision="fp32")
CONFIG = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=4, num_micro_batches=1)
PLAN = api.make_plan(REQUEST, api.predict(REQUEST, CONFIG)).to_dict()
MEASURED = {"steps": 20, "tokens_per_s": 1500.0, "step_s": 0.68, "peak_allocated_bytes": 7.4e7}


def test_record_run(benchmark, tmp_path):
    path, ids = tmp_path / "runs.sqlite", itertools.count()
    benchmark(lambda: record_run(new_record(PLAN, MEASURED, run_id=f"r{next(ids)}"), path))
    assert count_runs(path) >= 1


def test_import_public_cases(benchmark, tmp_path):
    stores = (tmp_path / f"runs{i}.sqlite" for i in itertools.count())
    report = benchmark.pedantic(lambda: import_paths([SHIPPED_CASES], next(stores)), rounds=3, iterations=1)
    assert report.errors == [] and report.outcomes["inserted"] > 100


def test_iter_1000_runs(benchmark, tmp_path):
    path = tmp_path / "runs.sqlite"
    runs = [from_record(new_record(PLAN, MEASURED, run_id=f"r{i}")) for i in range(1000)]
    with connect(path) as conn:
        insert_runs(conn, runs)
    assert len(benchmark(lambda: list(iter_runs(path)))) == 1000
