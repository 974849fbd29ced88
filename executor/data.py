"""Training data: Alpaca-style single-turn and ShareGPT-style multi-turn rows (JSON list or JSONL,
the formats of LLaMA2-Accessory's fine-tuning recipes), tokenized with the loss on responses only,
then packed into fixed-length sequences.

Packing concatenates examples (bos + prompt + response + eos) and cuts the stream every seq_len
tokens, the last piece padded (as Hugging Face's run_clm `group_texts`, without dropping the tail);
attention is causal over the packed sequence, without per-document masks. The order of examples is
shuffled per epoch with the run's seed, so the batch of step k is a pure function of (data, seed, k):
that index is the data position a checkpoint stores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from executor.tokenizer import Tokenizer
from planner.errors import InvalidRequest, require_regular_file

IGNORE_INDEX = -100  # labels the loss skips (torch.nn.functional.cross_entropy's default ignore_index)

# LLaMA2-Accessory / Stanford Alpaca prompt templates
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                       "further context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
CHAT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
               "helpful, detailed, and polite answers to the human's questions.")
HUMAN_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant", "chatgpt", "bard", "bing")


class BadRow(ValueError):
    """A row that cannot become a training example; counted and skipped."""


Segments = list[tuple[str, bool]]  # (text, trained on?)


def alpaca_segments(row: dict[str, Any]) -> Segments:
    instruction, output, extra = row.get("instruction"), row.get("output"), row.get("input", "")
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadRow("missing or empty 'instruction'")
    if not isinstance(output, str) or not output.strip():
        raise BadRow("missing or empty 'output'")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise BadRow("'input' must be a string")
    prompt = (ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT).format(instruction=instruction, input=extra)
    return [(prompt, False), (" " + output, True)]


def sharegpt_segments(row: dict[str, Any]) -> Segments:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("'conversations' must be a non-empty list")
    segments: Segments = [(CHAT_SYSTEM, False)]
    answered = False
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRow("each turn needs 'from' and a string 'value'")
        role = str(turn.get("from", "")).lower()
        if role == "system":
            segments[0] = (turn["value"], False)
        elif role in HUMAN_ROLES:
            segments.append((f"\n\n### Human: {turn['value']}\n### Assistant:", False))
        elif role in ASSISTANT_ROLES:
            segments.append((" " + turn["value"], True))
            answered = True
        else:
            raise BadRow(f"unknown role {turn.get('from')!r}")
    if not answered:
        raise BadRow("no assistant turn to learn from")
    return segments


def row_segments(row: Any) -> Segments:
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    if "conversations" in row:
        return sharegpt_segments(row)
    if "instruction" in row or "output" in row:
        return alpaca_segments(row)
    raise BadRow("neither Alpaca (instruction/output) nor ShareGPT (conversations)")


def read_rows(path: str) -> list[tuple[str, Any]]:
    """(where, parsed row or BadRow) for every row of a JSON list or a JSONL file."""
    file = Path(path).expanduser()
    require_regular_file(file, "--data")  # a FIFO would block the read forever
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read --data {path}: {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"--data {path} is not valid JSON (line {exc.lineno}: {exc.msg}); "
                                 "fix it or write one row per line (JSONL)") from None
        except (RecursionError, ValueError):  # nested 100,000 deep; an integer of over 4300 digits
            raise InvalidRequest(f"--data {path} is nested too deep or holds an unreadable number; fix it") from None
        return [(f"row {i + 1}", row) for i, row in enumerate(rows)]
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            found.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            found.append((f"line {number}", BadRow(f"invalid JSON ({exc.msg})")))
        except (RecursionError, ValueError):
            found.append((f"line {number}", BadRow("nested too deep or holds an unreadable number")))
    return found


@dataclass
class Example:
    ids: list[int]
    trained: list[bool]


@dataclass
class DataReport:
    rows: int = 0
    bad: int = 0
    first_errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "bad_rows": self.bad, "first_errors": self.first_errors}


def tokenize(segments: Segments, tokenizer: Tokenizer) -> Example:
    ids: list[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    trained = [False] * len(ids)
    for text, is_trained in segments:
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_trained] * len(piece)
    ids.append(tokenizer.eos_id)  # the response ends: learn to stop
    trained.append(True)
    return Example(ids, trained)


def load_examples(path: str, tokenizer: Tokenizer, max_bad_fraction: float) -> tuple[list[Example], DataReport]:
    """Parse and tokenize every row; bad rows are counted and skipped, too many stop the run."""
    report, examples = DataReport(), []
    for where, row in read_rows(path):
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            examples.append(tokenize(row_segments(row), tokenizer))
        except BadRow as exc:
            report.bad += 1
            if len(report.first_errors) < 3:
                report.first_errors.append(f"{where}: {exc}")
    if report.rows == 0 or not examples:
        raise InvalidRequest(f"--data {path} holds no usable rows ({report.bad} bad"
                             f"{': ' + report.first_errors[0] if report.first_errors else ''})")
    if report.bad > max_bad_fraction * report.rows:
        raise InvalidRequest(f"{report.bad} of {report.rows} rows in {path} are malformed (more than "
                             f"{max_bad_fraction:.0%}; first: {report.first_errors[0]}); fix the data or raise "
                             "--max-bad-fraction")
    return examples, report


class PackedData:
    """Packed sequences, epoch after epoch; `batch(step)` is deterministic (the data position)."""

    def __init__(self, examples: list[Example], seq_len: int, global_batch: int, seed: int, pad_id: int) -> None:
        self.examples, self.seq_len, self.global_batch = examples, seq_len, global_batch
        self.seed, self.pad_id = seed, pad_id
        self._epochs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the latest epoch only
        total_tokens = sum(len(e.ids) for e in examples)  # the same in every epoch
        self.sequences_per_epoch = -(-total_tokens // seq_len)

    def epoch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), each [sequences, seq_len] int64, of one shuffled pass over the examples."""
        if index not in self._epochs:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + index).shuffle(order)
            ids: list[int] = []
            labels: list[int] = []
            for i in order:
                example = self.examples[i]
                ids += example.ids
                labels += [t if keep else IGNORE_INDEX for t, keep in zip(example.ids, example.trained)]
            pad = -len(ids) % self.seq_len
            ids += [self.pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            shape = (-1, self.seq_len)
            self._epochs = {index: (torch.tensor(ids).view(shape), torch.tensor(labels).view(shape))}
        return self._epochs[index]

    def sequences(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`count` sequences from position `start` of the endless stream of epochs."""
        ids, labels = [], []
        epoch, offset = divmod(start, self.sequences_per_epoch)
        while count > 0:
            e_ids, e_labels = self.epoch(epoch)
            take = min(count, e_ids.shape[0] - offset)
            ids.append(e_ids[offset:offset + take])
            labels.append(e_labels[offset:offset + take])
            count, offset, epoch = count - take, 0, epoch + 1
        return torch.cat(ids), torch.cat(labels)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of optimizer step `step` (0-based): [global_batch, seq_len] ids and labels."""
        return self.sequences(step * self.global_batch, self.global_batch)
