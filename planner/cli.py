"""`planner` command line. Each subcommand lives with the package that implements it, as a module
with `add_arguments(parser, name)` and `run(args) -> int`: planner/commands/ (suggest, predict, ...),
executor/commands/ (train), calibration/commands/ (validate, check, calibrate, runs, oracle).
COMMANDS names them by string: planner never imports the packages above it (executor <- calibration)
except the one module of the command being run, when it runs, so `planner suggest` never pays for
torch (train) or streamlit, and works where executor/ and calibration/ are not installed.

Errors a person caused print one line on stderr: exit 2 for an invalid request, 3 when nothing
fits. Set PLANNER_DEBUG=1 for tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType

COMMANDS = {
    "suggest": ("planner.commands.suggest", "search every parallel configuration; show the fastest that fit"),
    "predict": ("planner.commands.predict", "memory and time of one explicit configuration"),
    "fits": ("planner.commands.fits", "what fits on a device: largest micro-batch and sequence, fewest devices"),
    "models": ("planner.commands.listing", "list the model catalog"),
    "hardware": ("planner.commands.listing", "list hardware presets and MoAI flavors"),
    "validate": ("calibration.commands.validate", "predicted vs measured on published runs, with errors"),
    "check": ("calibration.commands.validate", "flag published claims above the hardware's peak FLOP/s or memory"),
    "calibrate": ("calibration.commands.calibrate", "fit the calibration profile to measured runs"),
    "runs": ("calibration.commands.runs", "the store of measured runs: import, list, export"),
    "capacity": ("planner.commands.capacity", "time, GPU-hours and cost to train N tokens at each cluster size"),
    "export": ("planner.commands.export", "turn a Plan into a torchrun line, DeepSpeed/Accelerate/torchtitan config or Slurm script"),
    "train": ("executor.commands.train", "train with a Plan (torchrun, DDP/FSDP2/TP/PP) and record what was measured"),
    "oracle": ("calibration.commands.oracle", "the memory model against fake-tensor traces of real training steps"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage + message; people asked for one line that says what to change."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _command_module(name: str) -> ModuleType | None:
    """The module of subcommand `name`, imported now; None when its package is not installed."""
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            return None
        raise


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its help line; the arguments of `command` only (of all when None), so
    that running one command imports no other command's module."""
    parser = OneLineParser(prog="planner", description="Memory and throughput planner for LLM training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        subparser.set_defaults(_module=module_name)
        module = _command_module(name) if command in (None, name) else None
        if module is not None:
            module.add_arguments(subparser, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    from planner.errors import PlannerError
    from planner.progress import bars

    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    if command and _command_module(command) is None:
        package = COMMANDS[command][0].split(".")[0]
        print(f"planner {command}: needs the {package} package, which is not installed "
              "(install llm-planner with all its packages: pip install -e .)", file=sys.stderr)
        return 1
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        with bars(not getattr(args, "no_progress", False)):  # --no-progress of commands that draw bars
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
