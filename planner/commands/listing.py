"""planner models / planner hardware: what the planner knows."""

from __future__ import annotations

import argparse

from planner.commands.common import print_json

DESCRIPTION_CHARS = 64  # hardware descriptions are cut at a word to this many characters


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def run(args: argparse.Namespace) -> int:
    from planner import api
    from planner.format import gib, peak, shorten, table
    from planner.hardware import FLAVOR_DEVICE, MOAI_FLAVORS, flavor_devices

    if args.command == "models":
        rows = api.list_models()
        if args.json:
            print_json(rows)
            return 0
        print(table(["name", "params", "family", "layers", "hidden", "heads", "kv", "vocab", "experts"],
                    [[r["name"], f"{r['params']:,}", r["family"], r["layers"], r["hidden"], r["heads"], r["kv_heads"],
                      r["vocab"], r["experts"]] for r in rows], align="lrlrrrrrr"))
        print("\nAlso: --model path/to/config.json (llama, mistral, mixtral, qwen2, baichuan, gpt2, gpt_neox, mpt).")
        return 0
    rows = api.list_hardware()
    if args.json:
        print_json(rows)
        return 0
    print(table(["name", "chip", "memory GiB", "bf16 TFLOP/s", "fp8 TFLOP/s", "HBM TB/s", "per node", "description"],
                [[r["name"], r["chip"] or "-", gib(r["memory_bytes"]),
                  peak(r["peak_flops"].get("bf16")), peak(r["peak_flops"].get("fp8")),
                  f"{r['hbm_bandwidth_bytes_per_s'] / 1e12:.2f}", r["devices_per_node"],
                  shorten(r["description"], DESCRIPTION_CHARS)]
                 for r in rows], align="llrrrrrl"))
    flavors = ", ".join(f"{f} ({flavor_devices(f)})" for f in MOAI_FLAVORS)
    print(f"\nMoAI flavors (--flavor; devices = {FLAVOR_DEVICE}): {flavors}")
    print("Also: --gpu path/to/hardware.json with the same keys as the presets.")
    return 0
