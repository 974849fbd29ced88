"""`planner` command line. Each subcommand lives in planner/commands/<name>.py with
`add_arguments(parser)` and `run(args) -> int`; its module is imported only when it runs, so
`planner suggest` never pays for torch (train) or streamlit.

Errors a person caused print one line on stderr: exit 2 for an invalid request, 3 when nothing
fits. Set PLANNER_DEBUG=1 for tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = {
    "suggest": ("planner.commands.suggest", "search every parallel configuration; show the fastest that fit"),
    "predict": ("planner.commands.predict", "memory and time of one explicit configuration"),
    "fits": ("planner.commands.fits", "what fits on a device: largest micro-batch and sequence, fewest devices"),
    "models": ("planner.commands.listing", "list the model catalog"),
    "hardware": ("planner.commands.listing", "list hardware presets and MoAI flavors"),
    "validate": ("planner.commands.validate", "predicted vs measured on published runs, with errors"),
    "check": ("planner.commands.validate", "flag published claims above the hardware's peak FLOP/s or memory"),
    "calibrate": ("planner.commands.calibrate", "fit the calibration profile to measured runs"),
    "runs": ("planner.commands.runs", "the store of measured runs: import, list, export"),
    "capacity": ("planner.commands.capacity", "time, GPU-hours and cost to train N tokens at each cluster size"),
    "export": ("planner.commands.export", "turn a Plan into a torchrun line, DeepSpeed/Accelerate/torchtitan config or Slurm script"),
    "train": ("planner.commands.train", "train with a Plan (torchrun, DDP/FSDP2/TP/PP) and record what was measured"),
    "oracle": ("planner.commands.oracle", "the memory model against fake-tensor traces of real training steps"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + message; people asked for one line that says what to change."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="planner", description="Memory and throughput planner for LLM training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(command, name)
        command.set_defaults(_module=module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from planner.errors import PlannerError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except PlannerError as exc:
        print(f"planner {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("planner: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # an internal error: one line unless debugging
        if os.environ.get("PLANNER_DEBUG"):
            raise
        print(f"planner {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with PLANNER_DEBUG=1 for a traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
