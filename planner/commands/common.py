"""Options shared by several commands (INTERFACE.md: common options, explicit configuration)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from planner.specs import ATTENTION_IMPLS

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # also over 4300 digits: the echo is cut to stay one readable line
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text[:40]!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text[:40]!r}")
    return value


def positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text[:40]!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text[:40]!r}")
    return value


def lora_targets(text: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise argparse.ArgumentTypeError(f"takes a comma list of {','.join(LORA_TARGETS)}; got {text!r}")
    return targets


def add_model_hardware(parser: argparse.ArgumentParser, need_model: bool = True) -> None:
    parser.add_argument("--model", required=need_model,
                        help="catalog name (see `planner models`), a config.json, or a folder holding one")
    parser.add_argument("--gpu", help="hardware preset (see `planner hardware`) or a hardware JSON (default h100-sxm-80gb)")
    parser.add_argument("--gpus", type=positive_int, help="total number of devices (default: one node)")
    parser.add_argument("--gpus-per-node", type=positive_int, help="devices per node (default from the preset)")
    parser.add_argument("--flavor", help="a MoAI flavor such as 8xLarge.4096GB (sets --gpu and --gpus)")


def add_workload(parser: argparse.ArgumentParser) -> None:
    """One option per field of planner.specs.Workload (its metadata is the option's help)."""
    from dataclasses import MISSING, fields

    from planner.specs import Workload

    parse = {"lora_targets": lora_targets, "recompute_modules": str}
    for f in fields(Workload):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        default = None if f.default is MISSING else f.default
        if f.name == "seq_len":
            default = 4096
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=meta["help"])
        elif meta.get("choices"):
            parser.add_argument(flag, choices=meta["choices"], default=default, help=meta["help"])
        else:
            kind = parse.get(f.name, positive_int)
            parser.add_argument(flag, type=kind, default=default, help=meta["help"])
    parser.add_argument("--target", choices=("executor", "deepspeed", "accelerate", "torchtitan", "megatron"),
                        default="executor", help="the engine that will run the plan: rank only what it runs "
                                                 "(default executor, this project's own)")
    parser.add_argument("--calibration", help="a calibration profile JSON instead of the shipped default")
    parser.add_argument("--memory-margin", type=float, metavar="FRACTION",
                        help="headroom to keep free (default: from the profile's cross-validated memory errors)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout, nothing else")


def add_config(parser: argparse.ArgumentParser, required: bool) -> None:
    """Explicit configuration; for `suggest` every option pins that dimension."""
    parser.add_argument("--dp", type=positive_int, required=False)
    parser.add_argument("--tp", type=positive_int, required=False)
    parser.add_argument("--pp", type=positive_int, required=False)
    parser.add_argument("--micro-batch-size", type=positive_int)
    parser.add_argument("--recompute", choices=("none", "selective", "full"))
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3))
    parser.add_argument("--offload", choices=("none", "optimizer", "params"))
    parser.add_argument("--sequence-parallel", action="store_true", default=None)
    parser.add_argument("--vpp", type=positive_int)
    parser.add_argument("--cp", type=positive_int, help="context parallel degree: the sequence split over cp ranks (2 x cp must divide --seq-len)")
    parser.add_argument("--ep", type=positive_int, help="expert parallel degree (MoE): routed experts over ep ranks carved out of dp x cp")
    parser.add_argument("--shard-ends", action="store_true", default=None,
                        help="zero 3: the embedding and the LM head as FSDP units of their own (less memory)")


def request_from(args: argparse.Namespace):
    from planner.api import Request

    return Request(model=args.model, gpu=args.gpu, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                   flavor=args.flavor, **workload_options(args))


def workload_options(args: argparse.Namespace) -> dict:
    """The Request fields add_workload parses (everything but the model and the hardware)."""
    from dataclasses import fields

    from planner.specs import Workload

    values = {f.name: getattr(args, f.name) for f in fields(Workload)}
    values["lora_targets"] = tuple(values["lora_targets"])
    return dict(values, calibration=args.calibration, memory_margin=args.memory_margin, target=args.target)


def pins_from(args: argparse.Namespace):
    from planner.search import Pins

    return Pins(dp=args.dp, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch_size,
                recompute=args.recompute, zero=args.zero, offload=args.offload,
                sequence_parallel=args.sequence_parallel, vpp=args.vpp, shard_ends=args.shard_ends,
                cp=args.cp, ep=args.ep)


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
