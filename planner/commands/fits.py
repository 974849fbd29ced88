"""planner fits: what fits on a device type, per method (full, LoRA, QLoRA)."""

from __future__ import annotations

import argparse

from planner.commands.common import add_config, add_model_hardware, add_workload, pins_from, print_json, request_from


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    add_model_hardware(parser)
    add_workload(parser)
    add_config(parser, required=False)


def run(args: argparse.Namespace) -> int:
    from planner.whatfits import what_fits

    if args.gpus is None and not args.flavor:
        args.gpus = 1  # "what fits on one card?" unless told otherwise
    result = what_fits(request_from(args), pins_from(args))
    if args.json:
        print_json(result)
    else:
        print(render(result))
    return 0


def _how(config: dict) -> str:
    parts = [f"dp{config['dp']} tp{config['tp']} pp{config['pp']}", f"mbs {config['micro_batch_size']}",
             f"recompute {config['recompute']}", f"zero {config['zero']}"]
    if config["offload"] != "none":
        parts.append(f"offload {config['offload']}")
    return ", ".join(parts)


def render(result: dict) -> str:
    from planner.format import gib, table

    rows = []
    for row in result["methods"]:
        best = row["best"]
        rows.append([row["method"], "yes" if row["fits"] else "no",
                     gib(best["memory"]["peak_bytes"]) if best else "-",
                     f"{best['time']['tokens_per_s_per_device']:,.0f}" if best else "-",
                     row["largest_micro_batch"] or "-", row["longest_seq_len"] or "-",
                     row["fewest_devices"] or "> 16384", _how(best["config"]) if best else "-"])
    head = (f"{result['model']} on {result['gpus']} x {result['hardware']}, seq {result['seq_len']}, "
            f"global batch {result['global_batch']}")
    body = table(["method", "fits", "GiB/dev", "tok/s/dev", "max micro-batch", "max seq (mbs 1)", "fewest devices",
                  "fastest fitting configuration"], rows, align="llrrrrrl")
    note = (f"fits = fits with {result['memory_margin']:.0%} memory headroom (--memory-margin); max micro-batch: at "
            "this sequence length on these devices; max seq: with micro-batch 1; fewest devices: for this sequence "
            "and global batch")
    from planner.format import uncalibrated_note

    flag = uncalibrated_note(result.get("uncalibrated"))
    return f"{head}\n{body}\n{note}" + (f"\n{flag}" if flag else "")
