"""planner capacity: time, GPU-hours and cost to train a token budget at each device count (or
MoAI flavor), and the option that meets a deadline at least cost or is fastest under a budget."""

from __future__ import annotations

import argparse

from planner.commands.common import add_config, add_workload, pins_from, workload_options, positive_int, positive_number, print_json


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--model", required=True,
                        help="catalog name (see `planner models`), a config.json, or a folder holding one")
    parser.add_argument("--gpu", help="hardware preset or hardware JSON (default h100-sxm-80gb)")
    parser.add_argument("--gpus-per-node", type=positive_int, help="devices per node (default from the preset)")
    parser.add_argument("--tokens", type=positive_number, required=True, help="tokens to train, e.g. 2e9")
    parser.add_argument("--price-per-gpu-hour", type=positive_number,
                        help="USD per device-hour (default: the example list price in planner/presets/prices.json, if any)")
    parser.add_argument("--deadline-hours", type=positive_number, help="recommend the least cost that finishes in time")
    parser.add_argument("--budget", type=positive_number, help="USD; recommend the fastest option within it")
    parser.add_argument("--max-gpus", type=positive_int, default=1024, help="largest device count to consider (default 1024)")
    parser.add_argument("--flavor-family", choices=("moai",), help="consider MoAI flavors instead of device counts")
    add_workload(parser)
    add_config(parser, required=False)


def run(args: argparse.Namespace) -> int:
    from planner.api import Request
    from planner.capacity import plan_capacity

    # the memory margin too: it decides which device counts fit
    request = Request(model=args.model, gpu=args.gpu, gpus_per_node=args.gpus_per_node, **workload_options(args))
    result = plan_capacity(request, args.tokens, price_per_gpu_hour=args.price_per_gpu_hour,
                           deadline_hours=args.deadline_hours, budget=args.budget, max_gpus=args.max_gpus,
                           flavor_family=args.flavor_family, pins=pins_from(args))
    print_json(result) if args.json else print(render(result))
    return 0


def render(result: dict) -> str:
    from planner.format import uncalibrated_note
    from planner.format import count, duration, gib, table

    price = result["price_per_gpu_hour"]
    flavors = any(o["flavor"] for o in result["options"])
    rows = []
    for o in result["options"]:
        first = ["*" if o is result["recommendation"] else ""] + ([o["flavor"]] if flavors else []) + [o["gpus"]]
        if not o["fits"]:
            rows.append(first + ["-"] * 6 + ["does not fit: " + str(o["reason"])])
            continue
        rows.append(first + [f"{o['tokens_per_s']:,.0f}", f"{o['mfu']:.1%}", gib(o["peak_bytes"]),
                             duration(o["hours"] * 3600), f"{o['gpu_hours']:,.0f}",
                             "-" if o["cost"] is None else f"{o['cost']:,.0f}", "dominated" if o["dominated"] else ""])
    head = (f"{result['model']} on {result['hardware']}: {count(result['tokens'])} tokens, seq {result['seq_len']}, "
            f"global batch {result['global_batch']} ({result['tokens_per_step']:,} tokens/step), {result['method']}")
    headers = ["", *(["flavor"] if flavors else []), "devices", "tokens/s", "MFU", "GiB/dev", "time", "GPU-h", "cost USD", "note"]
    lines = [head, table(headers, rows, align="l" * (1 + flavors) + "r" * 7 + "l")]
    flag = uncalibrated_note(result.get("uncalibrated"))
    if flag:
        lines.append(flag)
    lines.append(f"price: {price:g} USD per device-hour: {result['price_source']}" if price is not None
                 else "price: none known for this hardware; pass --price-per-gpu-hour for costs")
    best = result["recommendation"]
    if best is None:
        lines.append(f"Recommendation ({result['rule']}): none; {result['unmet']}")
    else:
        cost = "" if best["cost"] is None else f", {best['cost']:,.0f} USD"
        lines.append(f"Recommendation ({result['rule']}): {best['flavor'] or str(best['gpus']) + ' x ' + best['hardware']}"
                     f" — {duration(best['hours'] * 3600)}, {best['gpu_hours']:,.0f} GPU-hours{cost}")
        lines.append(f"  {best['summary']}")
    return "\n".join(lines)
