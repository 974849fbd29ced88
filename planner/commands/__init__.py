"""One module per `planner` subcommand: add_arguments(parser, name) and run(args) -> exit code."""
