"""Real GPU memory next to the oracle and the planner (issue 3, item 5).

For every executor run recorded on a GPU (calibration/data/h100_runs/*.json: the Plan it ran and
`torch.cuda.max_memory_allocated` / `max_memory_reserved`), trace the same Plan with the oracle
(fake tensors, calibration/oracle.py) and predict it with the planner, and store the three side
by side in calibration/data/h100_runs/memory_vs_oracle.json:

    python -m calibration.gpu_memory

The oracle does not trace torch.compile (TORCH-NOTES), so compiled runs get no oracle figure.
tests/test_gpu_memory.py compares the stored measurements with the planner's prediction now.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RUNS_DIR = Path(__file__).parent / "data" / "h100_runs"
TABLE_FILE = RUNS_DIR / "memory_vs_oracle.json"
TABLE_FORMAT = "llm-planner/gpu-memory-vs-oracle@1"


def gpu_run_records(folder: Path = RUNS_DIR) -> list[tuple[str, dict[str, Any]]]:
    """(file name, run record) of every executor run with a measured allocated peak."""
    from planner.runrecord import RUN_FORMAT
    from planner.errors import read_json

    records = []
    for path in sorted(folder.glob("*.json")):
        record = read_json(path, "run record")
        measured = record.get("measured") if isinstance(record, dict) else None
        if (record.get("format") == RUN_FORMAT and record.get("origin") == "executor" and measured
                and measured.get("peak_allocated_bytes")):
            records.append((path.name, record))
    return records


def predicted_allocated_bytes(record: dict[str, Any]) -> float:
    """The planner's allocated peak for exactly the configuration the run record ran."""
    from planner.runrecord import from_record
    from planner import api

    run = from_record(record)
    return float(api.predict(run.request(), run.config)["memory"]["allocated_peak_bytes"])


def table_row(name: str, record: dict[str, Any]) -> dict[str, Any]:
    from calibration.oracle import trace
    from planner.plan import Plan

    plan = Plan.from_dict(record["plan"])
    spec, workload, config = plan.model, plan.workload, plan.config
    measured = record["measured"]
    oracle = None if workload.compile else trace(spec, workload, config)
    return {"file": name, "run_id": record["run_id"], "model": spec.name, "workload": workload.to_dict(),
            "config": config.to_dict(), "gpu": record.get("environment", {}).get("device"),
            "measured_allocated_bytes": measured["peak_allocated_bytes"],
            "measured_reserved_bytes": measured.get("peak_reserved_bytes"),
            "oracle_allocated_bytes": oracle and oracle["peak_bytes"],
            "oracle_peak_at": oracle and oracle["peak_at"],
            "predicted_allocated_bytes": predicted_allocated_bytes(record)}


def render(rows: list[dict[str, Any]]) -> str:
    from planner.format import GIB, table

    def gib(value: float | None) -> str:
        return "-" if value is None else f"{value / GIB:.2f}"

    def error(value: float | None, measured: float) -> str:
        return "-" if value is None else f"{value / measured - 1:+.1%}"

    lines = [[r["file"].removesuffix(".json"), gib(r["measured_allocated_bytes"]), gib(r["measured_reserved_bytes"]),
              gib(r["oracle_allocated_bytes"]), error(r["oracle_allocated_bytes"], r["measured_allocated_bytes"]),
              gib(r["predicted_allocated_bytes"]), error(r["predicted_allocated_bytes"], r["measured_allocated_bytes"])]
             for r in rows]
    header = ["run", "allocated GiB", "reserved GiB", "oracle GiB", "oracle err", "planner GiB", "planner err"]
    return table(header, lines)


def main(argv: list[str] | None = None) -> int:
    from calibration.oracle_grid import versions

    parser = argparse.ArgumentParser(prog="python -m calibration.gpu_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(TABLE_FILE), help="where to write the table")
    args = parser.parse_args(argv)
    rows = [table_row(name, record) for name, record in gpu_run_records()]
    Path(args.output).write_text(json.dumps({"format": TABLE_FORMAT, **versions(), "rows": rows}, indent=1) + "\n")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
