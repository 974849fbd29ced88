"""The planner's allocated peak against real H100 runs of the executor (issue 3, item 5).

The measurements are data (calibration/data/h100_runs/*.json: `torch.cuda.max_memory_allocated`
of executor runs on one H100 80GB HBM3, torch 2.11 + CUDA 13.0); the prediction is computed now,
so a change to the memory model that moves it away from the GPU fails here. The oracle's traces
of the same Plans are stored next to them (python -m calibration.gpu_memory)."""

from __future__ import annotations

import json

import pytest

from calibration.gpu_memory import TABLE_FILE, gpu_run_records, predicted_allocated_bytes

RECORDS = gpu_run_records()
EAGER = [(name, record) for name, record in RECORDS if not record["plan"]["workload"].get("compile")]
COMPILED = [(name, record) for name, record in RECORDS if record["plan"]["workload"].get("compile")]
# Bytes the model does not count: the cuBLAS workspace and the caching allocator's 512-byte
# rounding (a few tens of MiB on 27-60 GiB peaks).
TOLERANCE = 0.01


def test_there_are_real_gpu_runs_to_compare_with():
    assert len(EAGER) >= 5 and len(COMPILED) >= 2


@pytest.mark.parametrize("name,record", EAGER, ids=[name for name, _ in EAGER])
def test_eager_allocated_peak_within_one_percent_of_the_gpu(name, record):
    measured = record["measured"]["peak_allocated_bytes"]
    predicted = predicted_allocated_bytes(record)
    assert abs(predicted / measured - 1) <= TOLERANCE, (predicted / 2**30, measured / 2**30)


@pytest.mark.parametrize("name,record", COMPILED, ids=[name for name, _ in COMPILED])
def test_compiled_runs_within_ten_percent_and_not_under_predicted(name, record):
    """torch.compile keeps fewer activations than eager (Inductor's partitioner recomputes pointwise
    ops; planner/ops.py `Numerics.compiled`). The model keeps what the partitioner keeps for
    plain layers within 4 %; under selective recomputation it stays above, by 8 %."""
    measured = record["measured"]["peak_allocated_bytes"]
    ratio = predicted_allocated_bytes(record) / measured
    assert 1.0 <= ratio <= 1.10, ratio


def test_stored_oracle_traces_agree_with_the_gpu():
    rows = json.loads(TABLE_FILE.read_text())["rows"]
    traced = [row for row in rows if row["oracle_allocated_bytes"] is not None]
    assert len(traced) >= 5
    for row in traced:
        error = row["oracle_allocated_bytes"] / row["measured_allocated_bytes"] - 1
        assert abs(error) <= TOLERANCE, (row["file"], error)
