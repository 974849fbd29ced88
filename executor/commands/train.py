"""planner train: train with a Plan (executor/), for real, and record what happened."""

from __future__ import annotations

import argparse
import sys

from planner.commands.common import positive_int


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--plan", required=True, help="a Plan JSON from `planner suggest/predict --save-plan`")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every check the executor makes before launching (no data or devices needed): "
                             "exit 0 if the plan would run, 2 with the reasons if not")
    parser.add_argument("--data",
                        help="Alpaca-style (instruction/input/output) or ShareGPT-style (conversations) JSON or JSONL")
    parser.add_argument("--steps", type=positive_int, help="optimizer steps to reach")
    parser.add_argument("--output", help="run folder: metrics.jsonl, summary.json, checkpoints/, final/")
    parser.add_argument("--resume", nargs="?", const=True, default=False, type=_bool, metavar="BOOL",
                        help="continue from the newest complete checkpoint in --output (--resume, --resume true/false)")
    parser.add_argument("--checkpoint-every", type=positive_int, default=0, metavar="K", help="checkpoint every K steps")
    parser.add_argument("--eval-every", type=positive_int, default=0, metavar="K", help="evaluate every K steps on --eval-data")
    parser.add_argument("--eval-data", help="held-out rows in the same format as --data")
    parser.add_argument("--eval-batches", type=positive_int, default=2, metavar="N",
                        help="global batches of --eval-data per evaluation (default 2)")
    parser.add_argument("--init-from", metavar="DIR", help="a local safetensors model folder to start from (default: random init)")
    parser.add_argument("--tokenizer", help="a local tokenizer folder (default: the built-in byte-level tokenizer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine",
                        help="decay after the warm-up (default cosine, to lr x --min-lr-ratio at the last step)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="linear warm-up steps (default 3%% of --steps, at most 100)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="the final lr over the peak (default 0.1)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0,
                        help="clip the global gradient norm to this (default 1.0; 0: no clipping)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--max-bad-fraction", type=float, default=0.1,
                        help="stop when more than this share of the rows is malformed (default 0.1)")
    parser.add_argument("--memory-every", type=int, default=50,
                        help="CPU: measure tensor memory (MemTracker) on step 3 and every this many steps")
    parser.add_argument("--no-save", action="store_true", help="do not write the final model")
    parser.add_argument("--merge-lora", nargs="?", const=True, default=False, type=_bool, metavar="BOOL",
                        help="LoRA: also save the model with the adapter merged in, in DIR/merged (default false)")
    parser.add_argument("--chat-template", nargs="?", const=True, default=True, type=_bool, metavar="BOOL",
                        help="format rows with the tokenizer's chat template when it has one (default true)")
    parser.add_argument("--document-mask", nargs="?", const=True, default=False, type=_bool, metavar="BOOL",
                        help="packed documents do not attend to each other; positions restart (default false: with "
                             "sdpa transformers materialises a B x S x S mask, which the plan's memory does not count)")
    parser.add_argument("--tensorboard", nargs="?", const=True, default=True, type=_bool, metavar="BOOL",
                        help="TensorBoard event files in DIR/tensorboard when tensorboard is installed (default true)")
    parser.add_argument("--store", help="the measured-run store to record the run in (default: $PLANNER_STORE or "
                        "~/.local/share/llm-planner/runs.sqlite)")
    parser.add_argument("--no-store", action="store_true", help="keep the run record only in DIR/summary.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--fallback", action="store_true", help="after an out-of-memory failure, try the plan's runner-ups")
    parser.add_argument("--print-launch", action="store_true",
                        help="print the torchrun command (per node) instead of training")


def _bool(text: str) -> bool:
    """true/false, 1/0, yes/no (executor/options.py's parser; imported when an option uses it)."""
    from executor.options import parse_bool

    return parse_bool(text)


def _check_numbers(args: argparse.Namespace) -> None:
    """Checked here, before torchrun starts: a NaN learning rate used to fail only inside the workers."""
    from planner.errors import InvalidRequest
    from planner.validity import MAX_STEPS, check_number

    if not 0 <= args.max_bad_fraction <= 1:
        raise InvalidRequest(f"--max-bad-fraction must be between 0 and 1, got {args.max_bad_fraction}")
    check_number(args.lr, "--lr", 1e3)  # AdamW diverges far below 1e3; NaN and inf never train
    check_number(args.weight_decay, "--weight-decay", 1e3, allow_zero=True)
    check_number(args.max_grad_norm, "--max-grad-norm", 1e9, allow_zero=True)
    if not 0 <= args.min_lr_ratio <= 1:
        raise InvalidRequest(f"--min-lr-ratio must be between 0 and 1, got {args.min_lr_ratio}")
    for flag, value in (("--steps", args.steps), ("--checkpoint-every", args.checkpoint_every),
                        ("--eval-every", args.eval_every), ("--warmup-steps", args.warmup_steps or 0),
                        ("--memory-every", args.memory_every)):
        check_number(value, flag, MAX_STEPS, integer=True, allow_zero=flag != "--steps")
    if not -2**63 <= args.seed < 2**64:  # the range torch.manual_seed takes
        raise InvalidRequest(f"--seed must be a 64-bit whole number, got {args.seed:.4g}")


def run(args: argparse.Namespace) -> int:
    from executor.launch import dry_run, launch, print_launch
    from executor.options import RunOptions
    from planner.errors import InvalidRequest
    from planner.plan import load_plan

    if args.dry_run:
        code, message = dry_run(args.plan)
        print(f"planner train: {message}", file=sys.stdout if code == 0 else sys.stderr)
        return code
    missing = [f"--{name}" for name in ("data", "steps", "output") if getattr(args, name) is None]
    if missing:
        raise InvalidRequest(f"the following arguments are required to train: {', '.join(missing)} "
                             "(or --dry-run to check the plan only)")

    _check_numbers(args)
    load_plan(args.plan)  # the plan file, its layout and its model, before anything else
    options = RunOptions(plan=args.plan, data=args.data, steps=args.steps, output=args.output, resume=args.resume,
                         checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, eval_data=args.eval_data,
                         eval_batches=args.eval_batches, init_from=args.init_from, tokenizer=args.tokenizer,
                         seed=args.seed, lr=args.lr, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                         min_lr_ratio=args.min_lr_ratio, max_grad_norm=args.max_grad_norm,
                         weight_decay=args.weight_decay, max_bad_fraction=args.max_bad_fraction,
                         chat_template=args.chat_template, document_mask=args.document_mask,
                         merge_lora=args.merge_lora, tensorboard=args.tensorboard,
                         memory_every=args.memory_every, save_final=not args.no_save, progress=not args.no_progress,
                         store=args.store, record_in_store=not args.no_store)
    if args.print_launch:
        print(print_launch(options))
        return 0
    return launch(options, fallback=args.fallback)
