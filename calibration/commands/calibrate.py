"""planner calibrate: fit the calibration profile to measured runs (the store, or published cases)."""

from __future__ import annotations

import argparse

from calibration.commands.runs import ORIGIN_CHOICES
from planner.commands.common import print_json
from planner.progress import add_flag


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--store", help="run store to fit on (default: the default store if it holds runs)")
    parser.add_argument("--cases", help="a cases JSON to fit on instead (default: the shipped public cases)")
    parser.add_argument("--origin", choices=ORIGIN_CHOICES, help="only runs of this origin")
    parser.add_argument("--hardware", help="only runs on this hardware (e.g. one run on new hardware)")
    parser.add_argument("--base", help="profile to start from and use as the prior (default: the shipped one)")
    parser.add_argument("--out", default="calibrated-profile.json", help="where to write the fitted profile")
    parser.add_argument("--cross-validate", action="store_true",
                        help="also leave-one-source-out cross-validation: out-of-sample errors and intervals (slow; "
                             "each fold starts from --base, so its errors are out of sample only for runs "
                             "--base was not fitted on)")
    parser.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    add_flag(parser)


def run(args: argparse.Namespace) -> int:
    from calibration.fit import load_measurements, write_profile
    from calibration.validate import validate
    from planner.errors import InvalidRequest
    from planner.outfile import output_path
    from planner.profile import load_profile

    output_path(args.out, "fitted profile")  # before the fit
    runs = load_measurements(args.store, args.cases, args.origin, args.hardware)
    usable = [r for r in runs if r.usable and (r.tokens_per_s_per_device or r.memory_bytes)]
    if not usable:
        raise InvalidRequest("no usable measured runs to fit on; import some with `planner runs import` "
                             "or name --cases / --store")
    out = output_path(args.out, "fitted profile")
    data = write_profile(usable, load_profile(args.base), out, cross_validate=args.cross_validate)
    before, after = validate(usable, args.base), validate(usable, str(out))
    report = {"out": str(out), "runs": len(usable), "before": _stats(before), "after": _stats(after),
              "cross_validation": data.get("validation")}
    if args.json:
        print_json(report)
    else:
        print(_render(report))
    return 0


def _stats(result: dict) -> dict:
    return {"throughput": result["throughput"], "memory": result["memory"]}


def _render(report: dict) -> str:
    def line(stats: dict) -> str:
        parts = []
        for kind in ("throughput", "memory"):
            s = stats[kind]
            if s["n"]:
                parts.append(f"{kind} median {s['median_abs']:.1%} p90 {s['p90_abs']:.1%} (n={s['n']})")
        return "; ".join(parts) or "no comparable measurements"

    lines = [f"fitted on {report['runs']} runs -> {report['out']}",
             f"  in-sample error before: {line(report['before'])}",
             f"  in-sample error after:  {line(report['after'])}"]
    cv = report.get("cross_validation")
    if cv:
        lines.append(f"  out-of-sample (leave one source out): {line(cv)}")
    else:  # never the base profile's figures: they were not measured on this one
        lines.append("  out-of-sample: not computed for this profile (--cross-validate computes it)")
    lines.append(f"use it with --calibration {report['out']}")
    return "\n".join(lines)
