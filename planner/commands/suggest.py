"""planner suggest: every valid candidate, pruned by memory, ranked by predicted step time."""

from __future__ import annotations

import argparse

from planner.commands.common import add_config, add_model_hardware, add_workload, pins_from, positive_int, print_json, request_from


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_model_hardware(parser)
    add_workload(parser)
    add_config(parser, required=False)
    parser.add_argument("--top", type=positive_int, default=5, help="how many candidates to show (default 5)")
    parser.add_argument("--save-plan", metavar="PATH", help="write the best candidate's Plan JSON for `planner train`")


def run(args: argparse.Namespace) -> int:
    from planner import api
    from planner.errors import Infeasible
    from planner.plan import save_plan

    request = request_from(args)
    try:
        result = api.suggest(request, pins_from(args), top=args.top)
    except Infeasible as exc:
        if args.json:  # still the object (empty candidates, the reasons and the ways out), then exit 3
            print_json({**exc.details, "reason": str(exc)})
        raise
    if args.save_plan:
        plan = api.make_plan(request, result["candidates"][0], runner_ups=result["candidates"][1:])
        save_plan(args.save_plan, plan)
    if args.json:
        print_json(result)
    else:
        print(render(result, args.save_plan))
    return 0


def spread(bounds: list | None, unit: float) -> str:
    """' (low-high)' for a cross-validated interval, in the unit shown; '' without one."""
    if not bounds:
        return ""
    low, high = (b / unit for b in bounds)
    digits = ",.0f" if high >= 100 else ".1f"
    return f" ({low:{digits}}-{high:{digits}})"


def render(result: dict, saved: str | None) -> str:
    from planner.format import count, duration, gib, uncalibrated_note

    req = result["request"]
    w = req["workload"]
    method = w["method"] if w["method"] == "full" else f"{w['method']} r{w['lora_rank']}"
    lines = [f"{req['model']} ({count(req['params'])} params) on {req['gpus']} x {req['hardware']} "
             f"({req['gpus_per_node']} per node): seq {w['seq_len']}, global batch {w['global_batch']}, "
             f"{method}, {w['precision']}, {w['optimizer']} ({w['optimizer_impl']}), {w.get('framework', 'executor')}",
             f"searched {result['searched']:,} candidates ({result['evaluated']:,} valid and costed), "
             f"{result['feasible']:,} fit, in {result['seconds']:.2f} s", ""]
    best = result["candidates"][0]
    mem, time = best["memory"], best["time"]
    fixes = result.get("rejected_fixes") or {}
    lines += [f"Best: {result['summary']}",
              f"  step {duration(time['step_s'])}, {time['tokens_per_s']:,.0f}{spread(time['tokens_per_s_range'], 1)} "
              f"tokens/s ({time['tokens_per_s_per_device']:,.0f} per device), MFU {time['mfu']:.1%}, "
              f"{gib(mem['peak_bytes'])}{spread(mem['peak_bytes_range'], 2**30)} of {gib(mem['capacity_bytes'])} GiB "
              f"per device", ""]
    if result.get("margin_note"):
        lines += [f"Memory margin: {result['margin_note']}", ""]
    note = uncalibrated_note((req.get("calibration") or {}).get("uncalibrated"))
    if note:
        lines += [note, ""]
    lines.append(candidate_table(result["candidates"]))
    if result["explanation"]:
        lines += ["", "Why the runner-ups lost:"] + [f"  {line}" for line in result["explanation"]]
    lines += ["", "Memory of the best (GiB per device, " + mem["peak_phase"] + " peak): "
              + ", ".join(f"{k} {gib(v)}" for k, v in mem["breakdown"].items()),
              "Time of the best per step: " + ", ".join(f"{k} {duration(v)}" for k, v in time["breakdown"].items() if v > 0),
              "Rejected (and what would change it):"]
    lines += [f"  {k}: {v:,}" + (f" ({fixes[k]})" if fixes.get(k) else "") for k, v in result["rejected"].items()]
    if result.get("invalid_pairings"):
        lines.append(f"  ({result['invalid_pairings']:,} invalid pairings of options skipped)")
    if saved:
        lines.append(f"Plan written to {saved}: train with `planner train --plan {saved} ...`")
    return "\n".join(lines)


# the words of the seed-style summary line (planner/explain.py seed_summary), as column heads
COLUMNS = (("num_stages", "pp"), ("TP", "tp"), ("data_parallel", "dp"), ("batch_per_device", "micro_batch_size"),
           ("num_micro_batches", "num_micro_batches"), ("recomputation", "recompute"), ("zero", "zero"),
           ("offload", "offload"), ("sequence_parallel", "sequence_parallel"), ("virtual_stages", "vpp"))


# shown when a candidate uses them
OPTIONAL_COLUMNS = (("context_parallel", "cp"), ("expert_parallel", "ep"))


def candidate_table(candidates: list[dict]) -> str:
    from planner.format import gib, table

    columns = COLUMNS + tuple(col for col in OPTIONAL_COLUMNS if any(c["config"].get(col[1], 1) > 1 for c in candidates))
    rows = []
    for rank, c in enumerate(candidates, start=1):
        cfg = c["config"]
        values = ["y" if cfg[key] is True else "-" if cfg[key] is False else cfg[key] for _, key in columns]
        rows.append([rank, *values, gib(c["memory"]["peak_bytes"]), f"{c['time']['step_s']:.3f}",
                     f"{c['time']['tokens_per_s_per_device']:,.0f}", f"{c['time']['mfu']:.1%}"])
    heads = ["#", *[name for name, _ in columns], "GiB/dev", "step s", "tok/s/dev", "MFU"]
    return table(heads, rows, align="rrrrrrlrll" + "r" * (len(columns) - 10) + "rrrrr")
