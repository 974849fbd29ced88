"""The options of a training run (everything `planner train` takes besides the Plan), shared by
the launcher and the worker processes it starts."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from planner.errors import InvalidRequest
from planner.plan import ParallelConfig
from planner.specs import Workload

LR_SCHEDULES = ("cosine", "linear", "constant")
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")
WARMUP_SHARE, WARMUP_MAX_STEPS = 0.03, 100  # Alpaca / HF recipes: warmup_ratio 0.03, capped


def parse_bool(text: str) -> bool:
    """An argparse `type`: true/false, 1/0, yes/no, on/off (any case); anything else is an error."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (or 1/0, yes/no), got {text!r}")


def default_warmup_steps(steps: int) -> int:
    """3 % of the run, at most 100 steps (a practitioner's default when none is given)."""
    return min(WARMUP_MAX_STEPS, math.ceil(WARMUP_SHARE * steps))


@dataclass(frozen=True)
class RunOptions:
    plan: str
    data: str
    steps: int
    output: str
    resume: bool = False
    checkpoint_every: int = 0  # 0: only the final model
    eval_every: int = 0
    eval_data: str | None = None
    eval_batches: int = 2  # global batches of --eval-data per evaluation
    init_from: str | None = None
    tokenizer: str | None = None  # None / "bytes": the built-in byte-level tokenizer
    seed: int = 0
    lr: float = 3e-4
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None  # None: default_warmup_steps(steps)
    min_lr_ratio: float = 0.1  # the decay ends at lr x this
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    weight_decay: float = 0.0
    max_bad_fraction: float = 0.1
    chat_template: bool = True  # format rows with the tokenizer's chat template when it has one
    # packed documents: positions restart and attention stays inside each. Off by default: with sdpa,
    # transformers materialises a B x S x S mask for it (no flash kernel), which the planner does not count
    document_mask: bool = False
    memory_every: int = 50  # CPU: MemTracker on the 3rd step and every this many steps after
    save_final: bool = True
    merge_lora: bool = False  # LoRA: also save the base with the adapter merged in, DIR/merged
    tensorboard: bool = True  # DIR/tensorboard event files, when tensorboard is installed
    store: str | None = None  # the measured-run store (planner/runstore.py); None: its default path
    record_in_store: bool = True
    progress: bool = True

    @property
    def output_dir(self) -> Path:
        return Path(self.output).expanduser()

    @property
    def warmup(self) -> int:
        return default_warmup_steps(self.steps) if self.warmup_steps is None else self.warmup_steps

    def to_argv(self) -> list[str]:
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            flag = "--" + f.name.replace("_", "-")
            argv += [flag, str(value)]
        return argv

    @classmethod
    def parse(cls, argv: list[str]) -> RunOptions:
        parser = argparse.ArgumentParser(prog="executor.train")
        for f in fields(cls):
            flag, required = "--" + f.name.replace("_", "-"), f.name in ("plan", "data", "steps", "output")
            if f.type == "bool":  # `--resume`, `--resume true`, `--resume 0`
                parser.add_argument(flag, dest=f.name, default=f.default, type=parse_bool, nargs="?", const=True)
            else:
                parser.add_argument(flag, dest=f.name, default=f.default, type=_parser_for(f.type),
                                    required=required)
        return cls(**vars(parser.parse_args(argv)))

    def to_dict(self) -> dict:
        return asdict(self)


def _parser_for(type_name: str):
    return {"int": int, "int | None": int, "float": float}.get(type_name, str)


def check_options(options: RunOptions, workload: Workload, config: ParallelConfig) -> None:
    """What the options cannot do with this Plan: refused before any process starts (preflight)
    and again by the trainer (a worker started by hand)."""
    if (options.checkpoint_every or options.resume) and config.tp > 1 and config.dp > 1 and config.zero <= 1:
        # torch's TP + DDP recipe localizes the TP weights, and the optimizer's state of those cannot
        # be mapped back to DTensors for a sharded checkpoint (the final model is saved whole)
        raise InvalidRequest("checkpoints of dp x tp under ZeRO 0/1 are not implemented; plan with --zero 2 or 3 "
                             "(FSDP2), or drop --checkpoint-every / --resume")
    if options.merge_lora and workload.method != "lora":
        what = "a full fine-tune saves the whole model already" if workload.method == "full" else \
            "the QLoRA base is 4-bit; merge the adapter into the full-precision base with peft after training"
        raise InvalidRequest(f"--merge-lora applies to LoRA runs only ({what}); drop --merge-lora")
    if config.cp > 1 and options.document_mask:
        raise InvalidRequest("--document-mask with cp > 1 is not implemented (the ring attention runs full causal "
                             "attention); drop --document-mask or plan with --cp 1")
    if options.eval_every and config.pp > 1:
        raise InvalidRequest("--eval-every with pp > 1 is not implemented; drop --eval-every")
    if options.eval_every and not options.eval_data:
        raise InvalidRequest("--eval-every needs --eval-data (a held-out file in the same format)")
