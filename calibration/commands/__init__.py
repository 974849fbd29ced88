"""Calibration's `planner` subcommands (planner/cli.py dispatches to them by name): add_arguments(parser,
name) and run(args) -> exit code; heavy imports stay inside run()."""
