"""planner validate / planner check: the planner against published measured runs."""

from __future__ import annotations

import argparse

from planner.commands.common import print_json


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--cases", help="a cases JSON (validation/cases.json format); default: the shipped copy")
    if name == "validate":
        parser.add_argument("--store", nargs="?", const="", metavar="DB",
                            help="validate on the runs of a run store instead of the cases (no DB: $PLANNER_STORE "
                                 "or ~/.local/share/llm-planner/runs.sqlite)")
        parser.add_argument("--calibration", help="a calibration profile JSON instead of the shipped default")
        parser.add_argument("--all", action="store_true", help="also list excluded cases and why")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args: argparse.Namespace) -> int:
    from calibration.cases import load_cases

    if args.command == "check":
        return _check(load_cases(args.cases), args)
    if args.calibration:  # a bad profile is the request's fault, not every case's
        from planner.profile import load_profile
        load_profile(args.calibration)
    if args.store is not None:
        from calibration.fit import load_measurements
        from planner.runstore import default_store_path

        cases = load_measurements(store=str(args.store or default_store_path()))
    else:
        cases = load_cases(args.cases)
    from calibration.validate import validate

    result = validate(cases, args.calibration)
    if args.json:
        print_json(_as_json(result))
    else:
        print(_render(result, args.all))
    return 0


def _as_json(result: dict) -> dict:
    rows = []
    for r in result["rows"]:
        c = r.case
        rows.append({"id": c.id, "model": c.model, "hardware": c.hardware_name, "devices": c.devices,
                     "framework": c.workload.framework if c.workload else None,
                     "config": c.config.to_dict() if c.config else None, "excluded": r.error,
                     "measured_tokens_per_s_per_device": c.tokens_per_s_per_device,
                     "predicted_tokens_per_s_per_device": r.predicted_tokens_per_s,
                     "throughput_error": r.throughput_error, "measured_memory_bytes": c.memory_bytes,
                     "memory_kind": c.memory_kind, "predicted_memory_bytes": r.predicted_memory_bytes,
                     "memory_error": r.memory_error, "assumptions": c.assumptions, "source": c.source,
                     "fits": r.fits, "capacity_bytes": r.capacity_bytes,
                     "ran_but_predicted_not_to_fit": r.ran_but_predicted_not_to_fit,
                     "capacity_error": r.capacity_error})
    return {"throughput": result["throughput"], "memory": result["memory"], "by_source": result["by_source"],
            "by_hardware": result["by_hardware"], "cases": rows,
            "ran_but_predicted_not_to_fit": result["ran_but_predicted_not_to_fit"]}


def _fit_mark(row) -> str:
    """'RAN, predicted over' for a run that trained but was predicted above its devices' memory."""
    return "RAN, predicted over" if row.ran_but_predicted_not_to_fit else "yes"


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.0%}"


def _render(result: dict, show_all: bool) -> str:
    from planner.format import table

    rows, excluded = [], []
    for r in result["rows"]:
        c = r.case
        if r.error:
            excluded.append(f"  {c.id} {c.model}: {r.error}")
            continue
        rows.append([c.id, c.model[:22], c.hardware_name, c.workload.framework, c.devices,
                     f"{c.tokens_per_s_per_device:,.0f}" if c.tokens_per_s_per_device else "-",
                     f"{r.predicted_tokens_per_s:,.0f}", _pct(r.throughput_error),
                     f"{c.memory_bytes / 2**30:.1f}" if c.memory_bytes else "-",
                     f"{r.predicted_memory_bytes / 2**30:.1f}", _pct(r.memory_error),
                     _fit_mark(r)])
    lines = [table(["case", "model", "hardware", "framework", "devices", "tok/s/dev meas", "pred", "err",
                    "GiB meas", "pred", "err", "fits"], rows, align="llllrrrrrrrl")]
    for name in ("throughput", "memory"):
        s = result[name]
        if s["n"]:
            lines.append(f"{name}: n={s['n']}, median |error| {s['median_abs']:.1%}, 90th percentile {s['p90_abs']:.1%}")
    failed = [r for r in result["rows"] if r.ran_but_predicted_not_to_fit]
    if failed:
        lines.append(f"{len(failed)} runs that ran were predicted not to fit (failures; with no memory figure, the "
                     "excess over the device counts as their memory error): "
                     + ", ".join(f"{r.case.id} {r.predicted_memory_bytes / 2**30:.1f} of {r.capacity_bytes / 2**30:.1f} GiB"
                                 for r in failed))
    lines.append(f"{len(excluded)} cases excluded (not representable or not plausible)"
                 + (":" if show_all else "; --all lists them"))
    if show_all:
        lines += excluded
    return "\n".join(lines)


def _check(cases, args) -> int:
    from calibration.validate import plausibility
    from planner.format import table

    rows, out = [], []
    for c in cases:
        flags = plausibility(c)
        if not flags:
            continue
        out.append({"id": c.id, "model": c.model, "hardware": c.hardware_name, **flags})
        rows.append([c.id, c.model[:24], c.hardware_name, f"{flags.get('fraction_of_peak_min_flops', 0):.0%}"
                     if "fraction_of_peak_min_flops" in flags else "-",
                     f"{flags['fraction_of_memory']:.0%}" if "fraction_of_memory" in flags else "-",
                     f"{flags['fraction_floor_of_claim']:.0%}" if "fraction_floor_of_claim" in flags else "-",
                     "ok" if flags["plausible"] else "IMPOSSIBLE"])
    if args.json:
        print_json(out)
    else:
        print(table(["case", "model", "hardware", "min FLOP/s vs peak", "memory vs device", "floor vs memory",
                     "verdict"], rows, align="lllrrrl"))
        bad = [r for r in out if not r["plausible"]]
        print(f"{len(bad)} of {len(out)} claims are impossible: above the hardware (6N FLOPs per token, 4N with "
              "frozen weights, is a lower bound), or below the memory their own configuration must hold "
              "(single-device runs: weights, layer inputs, logits)")
    return 0
