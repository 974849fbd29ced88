"""planner predict: memory and time of one explicit configuration."""

from __future__ import annotations

import argparse

from planner.commands.common import add_config, add_model_hardware, add_workload, print_json, request_from


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_model_hardware(parser)
    add_workload(parser)
    add_config(parser, required=True)
    parser.add_argument("--save-plan", metavar="PATH", help="write this configuration's Plan JSON")


def run(args: argparse.Namespace) -> int:
    from planner import api
    from planner.plan import save_plan

    request = request_from(args)
    resolved = api.resolve(request)
    config = _config(args, resolved)
    prediction = api.predict(request, config)
    if args.save_plan:
        save_plan(args.save_plan, api.make_plan(request, prediction))
    if args.json:
        print_json(prediction)
    else:
        print(render(prediction, resolved))
    return 0


def _config(args: argparse.Namespace, resolved):
    """Fill what was not given: degrees default to pure data parallelism, micro-batch 1."""
    from planner.errors import InvalidRequest
    from planner.plan import ParallelConfig, num_micro_batches

    devices = resolved.cluster.num_devices
    tp, pp, cp = args.tp or 1, args.pp or 1, args.cp or 1
    dp = args.dp or (devices // (tp * pp * cp) if devices % (tp * pp * cp) == 0 else 0)
    if dp == 0:
        raise InvalidRequest(f"--tp {tp} x --pp {pp} x --cp {cp} does not divide the {devices} devices; choose "
                             "degrees whose product divides --gpus")
    mbs = args.micro_batch_size or 1
    gb = resolved.workload.global_batch
    if gb % (dp * mbs):
        raise InvalidRequest(f"--global-batch {gb} is not divisible by dp x micro-batch = {dp} x {mbs}; "
                             "change one of them")
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mbs, num_micro_batches=num_micro_batches(gb, dp, mbs),
                          recompute=args.recompute or "none", zero=args.zero if args.zero is not None else 0,
                          offload=args.offload or "none", sequence_parallel=bool(args.sequence_parallel),
                          vpp=args.vpp or 1, shard_ends=bool(args.shard_ends), cp=args.cp or 1, ep=args.ep or 1)


def render(p: dict, resolved) -> str:
    from planner.commands.suggest import spread
    from planner.explain import seed_summary
    from planner.format import duration, gib

    mem, time = p["memory"], p["time"]
    verdict = "fits" if p["fits"] else f"does NOT fit: {p['reason']}"
    lines = [f"{resolved.spec.name} on {resolved.cluster.num_devices} x {resolved.hardware.name}: {verdict}",
             seed_summary(p["config"]),
             f"memory per device: {gib(mem['peak_bytes'])}{spread(mem['peak_bytes_range'], 2**30)} GiB reserved "
             f"({gib(mem['allocated_peak_bytes'])} GiB tensors) of {gib(mem['capacity_bytes'])} GiB; peak during "
             f"{mem['peak_phase']}",
             "  " + ", ".join(f"{k} {gib(v)}" for k, v in mem["breakdown"].items()),
             f"step {duration(time['step_s'])}: {time['tokens_per_s']:,.0f}{spread(time['tokens_per_s_range'], 1)} tokens/s "
             f"({time['tokens_per_s_per_device']:,.0f} per device), MFU {time['mfu']:.1%}",
             "  " + ", ".join(f"{k} {duration(v)}" for k, v in time["breakdown"].items() if v > 0)]
    from planner.format import uncalibrated_note

    note = uncalibrated_note(p.get("uncalibrated"))
    if note:
        lines.append(note)
    runnable = p.get("runnable") or {}
    if runnable.get("reason"):
        lines.append(f"warning: {runnable['reason']}")
    if mem["host_bytes_per_device"]:
        lines.append(f"host memory per device (offload): {gib(mem['host_bytes_per_device'])} GiB")
    return "\n".join(lines)
