"""Run records as the executor writes them (DIR/summary.json, format llm-planner/run@1), for the
store's tests: a real Plan of llama-tiny on two CPU devices, made by the planner itself."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from planner import api
from planner.plan import ParallelConfig
from planner.runrecord import new_record

TINY_REQUEST = api.Request(model="llama-tiny", gpu="cpu", gpus=2, seq_len=128, global_batch=8, precision="fp32")
TINY_CONFIG = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=4, num_micro_batches=1, zero=1)


@cache
def _plan_json() -> str:
    return json.dumps(api.make_plan(TINY_REQUEST, api.predict(TINY_REQUEST, TINY_CONFIG)).to_dict())


def executor_record(run_id: str, tokens_per_s: float = 1500.0, status: str = "finished") -> dict[str, Any]:
    measured = {"steps": 20, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": tokens_per_s / 2,
                "step_s": 8 * 128 / tokens_per_s, "peak_allocated_bytes": 73_637_888, "peak_reserved_bytes": 83_886_080,
                "loss_first": 6.24, "loss_last": 5.91}
    if status != "finished":
        measured = dict.fromkeys(measured)
    return new_record(json.loads(_plan_json()), measured, status=status, run_id=run_id, when="2025-06-01T12:00:00Z",
                      error=None if status == "finished" else "CUDA out of memory",
                      environment={"torch": "2.13.0+cpu", "hostname": "test", "world_size": 2})


def write_summary(folder: Path, record: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "summary.json"
    path.write_text(json.dumps(record, indent=2))
    return path


def without(record: dict[str, Any], *path: str) -> dict[str, Any]:
    """A deep copy of the record with one nested key removed."""
    changed = copy.deepcopy(record)
    target = changed
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return changed
