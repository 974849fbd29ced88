"""planner runs import | list | export: the store of measured runs (planner/runstore.py).

    planner runs import validation/cases.json my_runs.csv runs/      # published, own, executor runs
    planner runs list --origin executor --hardware h100-sxm-80gb
    planner runs export --format csv --output runs.csv               # imports back to the same runs
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from planner.progress import add_flag

ORIGIN_CHOICES = ("executor", "published", "user")  # planner.runrecord.ORIGINS (a test keeps them equal)
STORE_HELP = "the store (SQLite file); default $PLANNER_STORE, else ~/.local/share/llm-planner/runs.sqlite"


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    sub = parser.add_subparsers(dest="runs_command", metavar="SUBCOMMAND", required=True)
    importing = sub.add_parser("import", help="store runs from files (cases JSON, run records, CSV / JSONL rows)",
                               description="Store measured runs: the public cases JSON, the executor's run records "
                                           "(summary.json files or folders holding them), or CSV / JSONL rows of "
                                           "one's own runs (columns: see README, Measured runs).")
    importing.add_argument("files", nargs="+", metavar="FILE", help=".json, .jsonl, .csv, or a folder of summary.json")
    importing.add_argument("--strict", action="store_true", help="store nothing if any row is bad")
    importing.add_argument("--replace", action="store_true",
                           help="overwrite stored runs whose run_id comes again with other content")
    importing.add_argument("--calibration", help="profile for the predictions of rows that bring none")
    add_flag(importing)
    listing = sub.add_parser("list", help="list stored runs with measured and predicted values")
    exporting = sub.add_parser("export", help="write stored runs as JSONL records or CSV rows")
    exporting.add_argument("--format", choices=("jsonl", "csv"), help="default: csv for an --output *.csv, else jsonl")
    exporting.add_argument("--output", metavar="FILE", help="write here instead of stdout")
    for command in (listing, exporting):
        command.add_argument("--origin", choices=ORIGIN_CHOICES, action="append", help="only these origins")
        command.add_argument("--hardware", action="append", help="only runs on this hardware preset name")
        command.add_argument("--model", action="append", help="only runs of this model name")
    for command in (importing, listing, exporting):
        command.add_argument("--store", metavar="DB", help=STORE_HELP)
    for command in (importing, listing):
        command.add_argument("--json", action="store_true", help="machine-readable output on stdout, nothing else")


def run(args: argparse.Namespace) -> int:
    return {"import": _import, "list": _list, "export": _export}[args.runs_command](args)


def _import(args: argparse.Namespace) -> int:
    from calibration.ingest import import_paths
    from planner.commands.common import print_json

    report = import_paths(args.files, args.store, strict=args.strict, replace=args.replace,
                          calibration=args.calibration)
    for error in report.errors:
        print(error, file=sys.stderr)
    if args.json:
        print_json(report.to_dict())
    elif report.written:
        counts = report.to_dict()
        print(f"{report.store}: {counts['inserted']} new, {counts['unchanged']} already stored, {counts['replaced']} "
              f"replaced ({report.excluded} flagged excluded); {counts['rejected']} rejected")
    else:
        print(f"nothing stored (--strict): {len(report.errors)} rows rejected", file=sys.stderr)
    return 2 if report.errors else 0


def _list(args: argparse.Namespace) -> int:
    from planner.runstore import iter_runs, store_path
    from planner.commands.common import print_json

    runs = list(iter_runs(args.store, origin=args.origin, hardware=args.hardware, model=args.model))
    if args.json:
        print_json([summary(run) for run in runs])
        return 0
    if not runs and not store_path(args.store).exists():
        print(f"no store at {store_path(args.store)} yet; add runs with `planner runs import FILE`", file=sys.stderr)
        return 0
    print(render(runs))
    return 0


def _export(args: argparse.Namespace) -> int:
    from calibration.ingest import export_runs
    from planner.runstore import iter_runs

    fmt = args.format or ("csv" if args.output and args.output.lower().endswith(".csv") else "jsonl")
    if args.output:
        from planner.outfile import output_path

        output_path(args.output, "runs export")  # before reading the store
    runs = iter_runs(args.store, origin=args.origin, hardware=args.hardware, model=args.model)
    if not args.output:
        export_runs(runs, fmt, sys.stdout)
        return 0
    from planner.outfile import output_path

    target = output_path(args.output, "runs export")
    partial = target.with_name(target.name + ".partial")
    with partial.open("w", encoding="utf-8", newline="") as out:
        written = export_runs(runs, fmt, out)
    partial.replace(target)  # a reader never sees half a file
    print(f"exported {written} runs to {target} ({fmt})", file=sys.stderr)
    return 0


def summary(run: Any) -> dict[str, Any]:
    """One stored run for `list --json`: the facts and the prediction made at the time."""
    return {"run_id": run.run_id, "origin": run.origin, "when": run.when, "status": run.status,
            "source": run.source, "excluded": run.excluded, "error": run.error, "model": run.model_name,
            "hardware": run.hardware_name, "num_devices": run.num_devices, "devices_per_node": run.devices_per_node,
            "workload": run.workload.to_dict() if run.workload else None,
            "config": run.config.to_dict() if run.config else None, "measured": run.measured.to_dict(),
            "predicted": {"tokens_per_s_per_device": run.predicted("time", "tokens_per_s_per_device"),
                          "step_s": run.predicted("time", "step_s"),
                          "peak_reserved_bytes": run.predicted("memory", "peak_bytes"),
                          "peak_allocated_bytes": run.predicted("memory", "allocated_peak_bytes"),
                          "fits": run.predicted("fits")},
            "calibration": {k: (run.calibration or {}).get(k) for k in ("name", "version")},
            "recorded_at": run.recorded_at}


def render(runs: list) -> str:
    from calibration.validate import error_stats
    from planner.format import table

    rows, throughput_errors, memory_errors = [], [], []
    for run in runs:
        tps, tps_error = _throughput(run)
        memory, memory_error = _memory(run)
        throughput_errors.append(tps_error if run.usable else None)
        memory_errors.append(memory_error if run.usable else None)
        rows.append([run.run_id[:28], run.origin, (run.when or "")[:10], run.model_name[:20], run.hardware_name,
                     run.num_devices or "-", _config_words(run), run.status, tps, _pct(tps_error), memory,
                     _pct(memory_error), ("excluded: " + run.excluded)[:48] if run.excluded else ""])
    lines = [table(["run", "origin", "when", "model", "hardware", "dev", "config", "status", "tok/s/dev meas/pred",
                    "err", "GiB meas/pred", "err", "note"], rows, align="llllllllrrrrl")]
    counts = {origin: sum(r.origin == origin for r in runs) for origin in ORIGIN_CHOICES}
    lines.append(f"{len(runs)} runs (" + ", ".join(f"{n} {o}" for o, n in counts.items() if n) + f"); "
                 f"{sum(r.usable for r in runs)} usable for fitting")
    for name, errors in (("throughput", throughput_errors), ("memory", memory_errors)):
        stats = error_stats(errors)
        if stats["n"]:
            lines.append(f"prediction made at the time, {name}: median |error| {stats['median_abs']:.1%}, "
                         f"90th percentile {stats['p90_abs']:.1%} (n={stats['n']})")
    return "\n".join(lines)


def _throughput(run: Any) -> tuple[str, float | None]:
    measured, predicted = run.measured.tokens_per_s_per_device, run.predicted("time", "tokens_per_s_per_device")
    return f"{_num(measured)}/{_num(predicted)}", _error(predicted, measured)


def _memory(run: Any) -> tuple[str, float | None]:
    """Reserved against the predicted reserved peak, else tensor bytes against predicted tensor bytes."""
    if run.measured.peak_reserved_bytes is not None:
        measured, predicted = run.measured.peak_reserved_bytes, run.predicted("memory", "peak_bytes")
    else:
        measured, predicted = run.measured.peak_allocated_bytes, run.predicted("memory", "allocated_peak_bytes")
    gib = 2**30
    text = f"{_num(measured and measured / gib, '.1f')}/{_num(predicted and predicted / gib, '.1f')}"
    return text, _error(predicted, measured)


def _config_words(run: Any) -> str:
    c = run.config
    if c is None:
        return "-"
    words = f"dp{c.dp} tp{c.tp} pp{c.pp} mb{c.micro_batch_size} {c.recompute[:3]} z{c.zero}"
    return words + (f" off:{c.offload}" if c.offload != "none" else "") + (" sp" if c.sequence_parallel else "")


def _error(predicted: float | None, measured: float | None) -> float | None:
    return None if not predicted or not measured else predicted / measured - 1


def _num(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"
