"""planner oracle: the planner's memory model against traces of real training steps.

Without --trace: the stored grid (calibration/data/oracle_grid.json), predicted vs traced per
point, with the category that is most off. With --trace: trace one configuration now (the same
options as `planner predict`, or --plan PATH), which needs torch and transformers.
"""

from __future__ import annotations

import argparse

from planner.commands.common import add_config, add_model_hardware, add_workload, print_json, request_from
from planner.progress import add_flag


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--grid", help="an oracle grid JSON (default: the shipped calibration/data/oracle_grid.json)")
    parser.add_argument("--trace", action="store_true",
                        help="trace one configuration now (give --plan, or --model and predict's options)")
    parser.add_argument("--plan", help="with --trace: a Plan JSON written by --save-plan")
    add_model_hardware(parser, need_model=False)
    add_workload(parser)
    add_config(parser, required=False)
    add_flag(parser)


def run(args: argparse.Namespace) -> int:
    from planner.errors import InvalidRequest

    if not args.trace:
        if args.plan or args.model:
            raise InvalidRequest("--plan and --model take effect with --trace; add --trace to trace one configuration")
        return _grid(args)
    if bool(args.plan) == bool(args.model):
        raise InvalidRequest("--trace needs either --plan PATH or --model M (with predict's options)")
    return _trace(args)


def _grid(args: argparse.Namespace) -> int:
    from calibration.oracle_check import compare, render, summary
    from calibration.oracle_grid import load_grid

    document = load_grid(args.grid)
    rows = compare(document)
    if args.json:
        print_json({"summary": summary(rows), "points": [r.to_dict() for r in rows]})
    else:
        print(render(rows, document))
    return 0


def _trace(args: argparse.Namespace) -> int:
    from calibration.oracle import PLANNER_GROUPS, trace
    from planner import api
    from planner.commands.predict import _config
    from planner.plan import load_plan

    if args.plan:
        document = load_plan(args.plan)
        spec, workload, config = document.model, document.workload, document.config
        prediction = document.prediction
    else:
        request = request_from(args)
        resolved = api.resolve(request)
        config = _config(args, resolved)
        spec, workload = resolved.spec, resolved.workload
        prediction = api.predict(request, config)
    result = trace(spec, workload, config)
    if args.json:
        print_json({"oracle": result, "prediction": prediction})
        return 0
    print(_render_trace(spec.name, result, prediction, PLANNER_GROUPS))
    return 0


def _render_trace(name: str, result: dict, prediction: dict | None, groups: tuple[str, ...]) -> str:
    from planner.format import gib

    traced = result["breakdown"]
    lines = [f"{name}: traced peak {gib(result['peak_bytes'])} GiB during {result['peak_at']} "
             f"(layers traced {result['layers_traced']}, {result['trace_seconds']:.0f} s)",
             "  traced:    " + ", ".join(f"{k} {gib(traced[k])}" for k in groups)]
    if prediction:
        memory = prediction["memory"]
        b = memory["breakdown"]
        predicted = {k: b[k] + (b["logits"] if k == "activations" else 0) for k in groups}
        error = memory["allocated_peak_bytes"] / result["peak_bytes"] - 1
        lines += ["  predicted: " + ", ".join(f"{k} {gib(predicted[k])}" for k in groups),
                  f"  planner {gib(memory['allocated_peak_bytes'])} GiB ({memory['peak_phase']}): error {error:+.1%}"]
    return "\n".join(lines)
