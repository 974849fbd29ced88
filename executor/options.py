"""The options of a training run (everything `planner train` takes besides the Plan), shared by
the launcher and the worker processes it starts."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path


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
    init_from: str | None = None
    tokenizer: str | None = None  # None / "bytes": the built-in byte-level tokenizer
    seed: int = 0
    lr: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_bad_fraction: float = 0.1
    memory_every: int = 50  # CPU: MemTracker on the 3rd step and every this many steps after
    save_final: bool = True
    store: str | None = None  # the measured-run store (planner/runstore.py); None: its default path
    record_in_store: bool = True
    progress: bool = True

    @property
    def output_dir(self) -> Path:
        return Path(self.output).expanduser()

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
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                                type=_parser_for(f.type), required=f.name in ("plan", "data", "steps", "output"))
        return cls(**vars(parser.parse_args(argv)))

    def to_dict(self) -> dict:
        return asdict(self)


def _bool(text: str) -> bool:
    return text == "True"


def _parser_for(type_name: str):
    return {"int": int, "float": float, "bool": _bool, "bool | None": _bool}.get(type_name, str)
