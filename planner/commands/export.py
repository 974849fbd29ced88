"""planner export: a Plan (from `planner suggest --save-plan`) as a torchrun line, a DeepSpeed JSON,
an Accelerate FSDP YAML, a torchtitan TOML or a Slurm script. The text goes to stdout (or --output-file);
notes about what the engine cannot express go to stderr."""

from __future__ import annotations

import argparse
import sys

from planner.commands.common import positive_int, positive_number


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("plan", metavar="PLAN", help="a Plan JSON written by `planner suggest --save-plan`")
    parser.add_argument("--format", required=True,
                        choices=("torchrun", "deepspeed", "accelerate", "torchtitan", "megatron", "slurm"),
                        help="torchtitan: a torchtitan 0.3 configuration module (--module/--config); "
                             "megatron: Megatron-LM's pretrain_gpt.py arguments")
    parser.add_argument("--data", default="$DATA", help="training data for the launch line (default: the shell's $DATA)")
    parser.add_argument("--steps", type=positive_int, help="optimizer steps (also sets Slurm's --time from the prediction)")
    parser.add_argument("--run-dir", help="output folder of the run (default runs/<model>)")
    parser.add_argument("--port", type=positive_int, default=29500, help="rendezvous port (default 29500)")
    parser.add_argument("--time-limit-hours", type=positive_number, help="Slurm --time (default: predicted time of --steps)")
    parser.add_argument("--output-file", "-o", metavar="PATH", help="write here instead of stdout")


def run(args: argparse.Namespace) -> int:
    from planner.export import LaunchOptions, export_plan, safe_name
    from planner.outfile import output_path, write_text
    from planner.plan import load_plan
    from planner.validity import MAX_HOURS, check_number

    if args.output_file:
        output_path(args.output_file, f"{args.format} export")  # before any work
    if args.time_limit_hours is not None:
        check_number(args.time_limit_hours, "--time-limit-hours", MAX_HOURS)
    plan = load_plan(args.plan)
    # the model's name reaches the folder cut to [A-Za-z0-9_.-]: never a `$(...)` inside double quotes
    options = LaunchOptions(plan_path=args.plan, data=args.data, output=args.run_dir or f"runs/{safe_name(plan.model.name)}",
                            steps=args.steps, port=args.port,
                            time_limit_s=None if args.time_limit_hours is None else args.time_limit_hours * 3600)
    result = export_plan(plan, args.format, options)
    if args.output_file:
        write_text(args.output_file, result.text, f"{args.format} export")
    else:
        sys.stdout.write(result.text)
    for note in result.notes:
        print(f"planner export: note: {note}", file=sys.stderr)
    return 0
