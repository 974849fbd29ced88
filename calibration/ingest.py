"""`planner runs import` / `export`: files to the store and back.

What a file holds is told apart item by item, so one mechanism reads them all:
  * a run record (an object with "format": "llm-planner/run@1", planner/runrecord.py), such as the
    executor's DIR/summary.json or a line of `planner runs export --format jsonl`;
  * a published case (an object with "model_shape" / "n_gpus", validation/cases.json format,
    adapted by calibration/cases.py; the file may be the whole {"cases": [...]} document);
  * a flat row (calibration/flat.py): a CSV row, or any other JSON object.
Files: .csv (with a header), .jsonl / .ndjson (one object a line), .json (one object or a list),
or a folder (every summary.json below it).

Every item is checked on its own: a bad row is reported as `FILE:LINE: column: what to change`
and never stops the good rows, unless `strict` (then nothing is written). Each run is stored with
the prediction made at the time: the record's own, else planner.api.predict's now.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from calibration.cases import Case, adapt_all
from calibration.flat import COLUMNS, check_columns, flat_row, run_from_flat
from planner.errors import InvalidRequest, PlannerError, require_regular_file
from planner.hardware import load_hardware, make_cluster
from planner.plan import check_config
from planner.progress import progress
from planner.runrecord import Measured, Run, from_record, to_record, with_prediction
from planner.runstore import CONFLICT, INSERTED, REPLACED, connect, insert_runs, store_path

EXPORT_FORMATS = ("jsonl", "csv")


@dataclass
class Entry:
    """One item read from a file: a typed run, or why it could not be read."""

    where: str
    run: Run | None = None
    error: str | None = None


@dataclass
class ImportReport:
    store: str
    outcomes: Counter = field(default_factory=Counter)  # inserted / unchanged / replaced / ...
    excluded: int = 0  # stored runs flagged as unusable for fitting
    errors: list[str] = field(default_factory=list)
    written: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "written": self.written, "excluded": self.excluded, "rejected": len(self.errors),
                **{k: self.outcomes.get(k, 0) for k in ("inserted", "unchanged", "replaced")}, "errors": self.errors}


def import_paths(paths: Iterable[str | Path], db_path: str | Path | None = None, strict: bool = False,
                 replace: bool = False, calibration: str | None = None) -> ImportReport:
    """Read every file, check every item, predict what lacks a prediction, store the good ones."""
    report = ImportReport(store=str(store_path(db_path)))
    entries = [entry for path in paths for entry in read_entries(Path(path))]
    runs, wheres = [], []
    with progress(len(entries), "importing runs") as advance:
        for entry in entries:
            if entry.error:
                report.errors.append(f"{entry.where}: {entry.error}")
            else:
                runs.append(with_prediction(entry.run, calibration))  # the slow part: a prediction per run
                wheres.append(entry.where)
            advance()
    if strict and report.errors:
        report.written = False
        return report
    with connect(db_path) as conn:
        outcomes = insert_runs(conn, runs, replace=replace, atomic=strict)
    for run, where, outcome in zip(runs, wheres, outcomes):
        report.outcomes[outcome] += 1
        if outcome == CONFLICT:
            report.errors.append(f"{where}: run_id: {run.run_id!r} is already stored with other content; "
                                 "give it another run_id, or --replace to overwrite the stored run")
        elif outcome in (INSERTED, REPLACED) and run.excluded:
            report.excluded += 1
    report.written = not (strict and report.errors)  # strict: one transaction, rolled back on a conflict
    return report


def read_entries(path: Path) -> Iterator[Entry]:
    if path.is_dir():
        found = sorted(path.rglob("summary.json"))
        if not found:
            yield Entry(str(path), error="no summary.json below this folder; give run files or run folders")
        for summary in found:
            yield from read_entries(summary)
        return
    try:
        require_regular_file(path, "run file")  # a FIFO would block the read forever
        content = path.read_text(encoding="utf-8-sig")
    except InvalidRequest as exc:
        yield Entry(str(path), error=str(exc))
        return
    except (OSError, UnicodeDecodeError) as exc:
        yield Entry(str(path), error=f"cannot read it ({getattr(exc, 'strerror', None) or exc}); give a readable file")
        return
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_entries(path, content)
    elif suffix in (".jsonl", ".ndjson"):
        yield from _jsonl_entries(path, content)
    elif suffix == ".json":
        yield from _json_entries(path, content)
    else:
        yield Entry(str(path), error="cannot tell the format; name the file .csv, .jsonl or .json")


def _csv_entries(path: Path, content: str) -> Iterator[Entry]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    try:
        check_columns([name for name in reader.fieldnames or [] if name])
    except InvalidRequest as exc:
        yield Entry(f"{path}:1", error=str(exc))
        return
    if not reader.fieldnames:
        yield Entry(str(path), error="empty; a CSV needs a header line of column names")
        return
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:  # a cell over csv.field_size_limit() (131,072 characters), a NUL byte, ...
            yield Entry(f"{path}:{reader.line_num}", error=f"unreadable CSV ({exc}); fix the file")
            return
        where = f"{path}:{reader.line_num}"
        if None in row:
            yield Entry(where, error="more cells than the header has columns")
            continue
        yield _entry(where, {k: v for k, v in row.items() if k}, path.parent)


def _jsonl_entries(path: Path, content: str) -> Iterator[Entry]:
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Entry(f"{path}:{number}", error=f"not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except (RecursionError, ValueError):  # nested 100,000 deep; an integer of over 4300 digits
            yield Entry(f"{path}:{number}", error="nested too deep or holds an unreadable number; fix the line")
            continue
        yield _entry(f"{path}:{number}", item, path.parent)


def _json_entries(path: Path, content: str) -> Iterator[Entry]:
    try:
        document = json.loads(content)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object a line, named .json
            yield from _jsonl_entries(path, content)
        else:
            yield Entry(f"{path}:{exc.lineno}", error=f"not valid JSON ({exc.msg} at column {exc.colno})")
        return
    except (RecursionError, ValueError):  # nested 100,000 deep; an integer of over 4300 digits
        yield Entry(str(path), error="nested too deep or holds an unreadable number; fix the file")
        return
    if isinstance(document, dict) and isinstance(document.get("cases"), list):
        document = document["cases"]
    items = document if isinstance(document, list) else [document]
    # published cases are adapted together, as validation and fitting load them (calibration/cases.py)
    case_rows = [item for item in items if isinstance(item, dict) and _is_case(item)]
    adapted = dict(zip(map(id, case_rows), _adapt_all(case_rows), strict=True))
    for number, item in enumerate(items, start=1):
        where = f"{path}" if len(items) == 1 and not isinstance(document, list) else f"{path}: item {number}"
        if isinstance(item, dict) and _is_case(item):
            where = f"{path}: case {item.get('id', number)}"
        yield _entry(where, item, path.parent, adapted.get(id(item)))


def _adapt_all(rows: list[dict[str, Any]]) -> list[Case | None]:
    try:
        return adapt_all(rows)
    except PlannerError:  # each row then reports its own error
        return [None] * len(rows)


def _is_case(item: dict[str, Any]) -> bool:
    return "format" not in item and ("model_shape" in item or "n_gpus" in item)


def _entry(where: str, item: Any, base_dir: Path, case: Case | None = None) -> Entry:
    if not isinstance(item, dict):
        return Entry(where, error="must be a JSON object (a run record, a published case or a flat row)")
    try:
        if "format" in item:
            run = from_record(item, default_source=where)
        elif _is_case(item):
            run = run_from_case(item, case)
        else:
            run = run_from_flat(item, where, base_dir)
    except PlannerError as exc:
        return Entry(where, error=str(exc))
    return Entry(where, run=run)


def run_from_case(raw: dict[str, Any], case: Case | None = None) -> Run:
    """A published case (kept even when excluded, flagged, with the original row in `input`):
    `case` as its file's rows adapt it (calibration/cases.py adapt_all, which also flags memory
    claims below what the configuration holds), else the row alone."""
    case = case if case is not None else adapt_all([raw])[0]
    hardware = load_hardware(case.hardware) if case.hardware else None
    per_node = case.devices_per_node
    if hardware is not None and case.devices > 0:
        try:
            per_node = make_cluster(hardware, case.devices, case.devices_per_node).devices_per_node
        except InvalidRequest:
            pass
    memory_column = "peak_allocated_bytes" if case.memory_kind == "allocated" else "peak_reserved_bytes"
    measured = Measured.from_dict({"tokens_per_s_per_device": case.tokens_per_s_per_device,
                                   memory_column: case.memory_bytes}, case.devices or None)
    run = Run(run_id=f"published:{case.id}", origin="published", status="finished", model_name=case.model,
              hardware_name=case.hardware or str(raw.get("hardware")), num_devices=case.devices or None,
              devices_per_node=per_node, spec=case.spec, hardware=hardware, workload=case.workload,
              config=case.config, measured=measured, source=case.source, excluded=case.excluded,
              details=_case_details(case), input=raw)
    return run if run.excluded else _refused_or_kept(run)


def _case_details(case: Case) -> dict[str, Any]:
    details = {"case_id": case.id, "framework": case.framework, "memory_kind": case.memory_kind,
               "tflops_per_device": case.tflops_per_device,
               "claimed_tokens_per_s_per_device": case.claimed_tokens_per_s_per_device,
               "memory_upper_bound_bytes": case.memory_upper_bound_bytes, "assumptions": case.assumptions}
    return {k: v for k, v in details.items() if v not in (None, "", [])}


def _refused_or_kept(run: Run) -> Run:
    """A published configuration the planner cannot run is stored, excluded with the reason."""
    try:
        check_config(run.spec, run.workload, run.cluster, run.config)
    except InvalidRequest as exc:
        return replace(run, excluded=f"the planner refuses the configuration: {exc}")
    return run


# -- export -------------------------------------------------------------------------------------

def export_runs(runs: Iterable[Run], fmt: str, out: TextIO) -> int:
    """Write runs as JSONL records (lossless) or CSV flat rows; both import back to the same runs."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidRequest(f"--format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    written = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=[c for c in COLUMNS if c != "peak_memory_gib"], lineterminator="\n")
        writer.writeheader()
    for run in runs:
        if fmt == "csv":
            writer.writerow(flat_row(run))
        else:
            out.write(json.dumps(to_record(run), sort_keys=True) + "\n")
        written += 1
    return written
