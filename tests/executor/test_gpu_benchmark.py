"""benchmarks/gpu_executor_vs_hf.py runs its code paths on CPU (--dry-run, llama-tiny): the executor
through `planner train`, the Hugging Face Trainer at the same batch, run records and the table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.executor.conftest import ROOT


@pytest.mark.slow  # ~25 s
def test_dry_run_executes_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_executor_vs_hf.py", "--out", str(tmp_path), "--dry-run",
                           "--skip-sweep"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    executor, hf = result["rows"]
    assert executor["status"] == hf["status"] == "finished"
    assert executor["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0 and 0 < executor["mfu"] < 1
    assert executor["peak_allocated_bytes"] > 0 and executor["predicted_allocated_bytes"] > 0
    records = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*.json")}
    assert set(records) == {"executor", "hf-trainer"}
    assert all(r["format"] == "llm-planner/run@1" for r in records.values())
    same = ("micro_batch_size", "num_micro_batches", "recompute")
    assert all(records["executor"]["plan"]["config"][k] == records["hf-trainer"]["plan"]["config"][k] for k in same)
    assert "executor / HF Trainer tokens/s" in proc.stdout
