"""planner train: train with a Plan (executor/), for real, and record what happened."""

from __future__ import annotations

import argparse

from planner.commands.common import positive_int


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--plan", required=True, help="a Plan JSON from `planner suggest/predict --save-plan`")
    parser.add_argument("--data", required=True,
                        help="Alpaca-style (instruction/input/output) or ShareGPT-style (conversations) JSON or JSONL")
    parser.add_argument("--steps", type=positive_int, required=True, help="optimizer steps to reach")
    parser.add_argument("--output", required=True, help="run folder: metrics.jsonl, summary.json, checkpoints/, final/")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --output")
    parser.add_argument("--checkpoint-every", type=positive_int, default=0, metavar="K", help="checkpoint every K steps")
    parser.add_argument("--eval-every", type=positive_int, default=0, metavar="K", help="evaluate every K steps on --eval-data")
    parser.add_argument("--eval-data", help="held-out rows in the same format as --data")
    parser.add_argument("--init-from", metavar="DIR", help="a local safetensors model folder to start from (default: random init)")
    parser.add_argument("--tokenizer", help="a local tokenizer folder (default: the built-in byte-level tokenizer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-bad-fraction", type=float, default=0.1,
                        help="stop when more than this share of the rows is malformed (default 0.1)")
    parser.add_argument("--memory-every", type=int, default=50,
                        help="CPU: measure tensor memory (MemTracker) on step 3 and every this many steps")
    parser.add_argument("--no-save", action="store_true", help="do not write the final model")
    parser.add_argument("--store", help="the measured-run store to record the run in (default: $PLANNER_STORE or "
                        "~/.local/share/llm-planner/runs.sqlite)")
    parser.add_argument("--no-store", action="store_true", help="keep the run record only in DIR/summary.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fallback", action="store_true", help="after an out-of-memory failure, try the plan's runner-ups")
    parser.add_argument("--print-launch", action="store_true",
                        help="print the torchrun command (per node) instead of training")


def _check_numbers(args: argparse.Namespace) -> None:
    """Checked here, before torchrun starts: a NaN learning rate used to fail only inside the workers."""
    from planner.errors import InvalidRequest
    from planner.validity import MAX_STEPS, check_number

    if not 0 <= args.max_bad_fraction <= 1:
        raise InvalidRequest(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    check_number(args.lr, "--lr", 1e3)  # AdamW diverges far below 1e3; NaN and inf never train
    check_number(args.weight_decay, "--weight-decay", 1e3, allow_zero=True)
    for flag, value in (("--steps", args.steps), ("--checkpoint-every", args.checkpoint_every),
                        ("--eval-every", args.eval_every), ("--warmup-steps", max(args.warmup_steps, 0)),
                        ("--memory-every", args.memory_every)):
        check_number(value, flag, MAX_STEPS, integer=True, allow_zero=flag != "--steps")
    if not -2**63 <= args.seed < 2**64:  # the range torch.manual_seed takes
        raise InvalidRequest(f"--seed must be a 64-bit whole number, got {args.seed:.4g}")


def _check_plan(path: str) -> None:
    """Before any process starts: the plan's hf_config builds the model the plan predicted for, and
    runs its sequence length (planner/validity.py; transformers' own build is the executor's check)."""
    from planner.plan import load_plan, typed_plan
    from planner.validity import check_sequence, check_spec_matches_config

    spec, _hardware, _cluster, workload, _config = typed_plan(load_plan(path))
    check_spec_matches_config(spec)
    check_sequence(spec, workload.seq_len)


def _launch_text(options) -> str:
    """The torchrun line(s) of --print-launch, every word escaped for the shell: arguments holding
    `$(...)`, backticks or quotes are single-quoted; only plain `$VAR` references expand."""
    from executor.launch import worker_command
    from planner.export import shell_join
    from planner.plan import load_plan, typed_plan

    cluster = typed_plan(load_plan(options.plan))[2]
    per_node, nnodes = min(cluster.devices_per_node, cluster.num_devices), cluster.num_nodes
    head = "# on every node (set NODE_RANK and MASTER_ADDR):" if nnodes > 1 else "# on this node:"
    return f"{head}\nOMP_NUM_THREADS=1 " + shell_join(worker_command(options, per_node, nnodes))


def run(args: argparse.Namespace) -> int:
    from executor.launch import launch
    from executor.options import RunOptions

    _check_numbers(args)
    _check_plan(args.plan)
    options = RunOptions(plan=args.plan, data=args.data, steps=args.steps, output=args.output, resume=args.resume,
                         checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_data=args.eval_data,
                         init_from=args.init_from, tokenizer=args.tokenizer, seed=args.seed, lr=args.lr,
                         warmup_steps=max(args.warmup_steps, 0), weight_decay=args.weight_decay,
                         max_bad_fraction=args.max_bad_fraction,
                         memory_every=args.memory_every, save_final=not args.no_save, progress=not args.no_progress,
                         store=args.store, record_in_store=not args.no_store)
    if args.print_launch:
        print(_launch_text(options))
        return 0
    return launch(options, fallback=args.fallback)
