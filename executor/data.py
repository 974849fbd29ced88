"""Training data: Alpaca-style single-turn, ShareGPT-style multi-turn (the formats of
LLaMA2-Accessory's fine-tuning recipes) and OpenAI-style `messages` rows, from a JSON list, JSONL or
Parquet file, tokenized with the loss on responses only, then packed into fixed-length sequences.

Files are read by the `datasets` library (`load_dataset("json" | "parquet", data_files=...)`) when
it is installed; when it is not, or it cannot read a file (a malformed line, columns whose types
differ between rows), the built-in readers below read it, and name each bad row.

Prompts: a tokenizer with a chat template formats the conversation (`apply_chat_template`, see
executor/chat.py); otherwise the Alpaca / Vicuna instruction format below (the byte tokenizer).

Packing concatenates examples (bos + prompt + response + eos) and cuts the stream every seq_len
tokens, the last piece padded (as Hugging Face's run_clm `group_texts`, without dropping the tail).
Each example's position ids restart at 0 (a piece cut off the previous sequence continues its
count), which is how transformers recognises packed documents (masking_utils
`find_packed_sequence_indices`): with --document-mask the model gets them and attention stays
inside each document (flash-attention-2: varlen kernels; sdpa/eager, the CPU path: a block-diagonal
causal mask). The order of examples is shuffled per epoch with the run's seed, so the batch of step
k is a pure function of (data, seed, k): that index is the data position a checkpoint stores.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from executor.rows import (ALPACA_PROMPT, ALPACA_PROMPT_INPUT, ASSISTANT_ROLES, CHAT_SYSTEM,  # noqa: F401
                           HUMAN_ROLES, BadRow, Segments, alpaca_segments, sharegpt_segments)
from executor.tokenizer import Tokenizer
from planner.errors import InvalidRequest, require_regular_file

IGNORE_INDEX = -100  # labels the loss skips (torch.nn.functional.cross_entropy's default ignore_index)


def row_segments(row: Any, tokenizer: Tokenizer | None = None) -> Segments:
    if not isinstance(row, dict):
        raise BadRow("not a JSON object")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        from executor.chat import chat_segments

        return chat_segments(row, tokenizer)
    if "messages" in row:
        from executor.chat import row_messages

        return sharegpt_segments({"conversations": [{"from": m["role"], "value": m["content"]}
                                                    for m in row_messages(row)]})
    if "conversations" in row:
        return sharegpt_segments(row)
    if "instruction" in row or "output" in row:
        return alpaca_segments(row)
    raise BadRow("neither Alpaca (instruction/output), ShareGPT (conversations) nor chat (messages)")


def _without_nulls(value: Any) -> Any:
    """A row as its file wrote it: `datasets` gives every row every column of the file (None where
    a row lacks the key), recursively in nested objects."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def read_with_datasets(file: Path) -> list[tuple[str, Any]] | None:
    """(where, row) for every row through `datasets.load_dataset`, or None when the library is not
    installed or cannot read the file (the built-in readers then say what is wrong, row by row)."""
    try:
        import datasets
    except ImportError:
        return None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its json builder logs a failed parse as an error; ours names the row
    builder = "parquet" if file.suffix == ".parquet" else "json"
    with tempfile.TemporaryDirectory(prefix="executor-data-") as cache:  # no shared cache between ranks
        try:
            rows = datasets.load_dataset(builder, data_files=str(file), split="train", cache_dir=cache,
                                         keep_in_memory=True).to_list()
            places = _row_places(file, builder, len(rows))
        except Exception:  # noqa: BLE001 - any failure: the built-in readers name the bad rows
            return None
    return None if places is None else [(where, _without_nulls(row)) for where, row in zip(places, rows)]


def _row_places(file: Path, builder: str, count: int) -> list[str] | None:
    """How the built-in readers name the rows: "row N" of a JSON list or Parquet file, "line N" of a
    JSONL file (blank lines skipped); None when the lines do not match the rows read."""
    with open(file, "rb") as f:
        is_list = f.read(4096).lstrip().startswith(b"[")
    if builder == "parquet" or is_list:
        return [f"row {i + 1}" for i in range(count)]
    numbers = [i for i, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    return [f"line {n}" for n in numbers] if len(numbers) == count else None


def read_parquet(file: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidRequest(f"reading {file} needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
    try:
        rows = pq.read_table(str(file)).to_pylist()
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read the Parquet file {file}: {str(exc).splitlines()[0]}") from None
    return [(f"row {i + 1}", row) for i, row in enumerate(rows)]


def read_rows(path: str) -> list[tuple[str, Any]]:
    """(where, parsed row or BadRow) for every row of a JSON list, a JSONL or a Parquet file."""
    file = Path(path).expanduser()
    require_regular_file(file, "--data")  # a FIFO would block the read forever
    rows = read_with_datasets(file)
    if rows is not None:
        return rows
    if file.suffix == ".parquet":
        return read_parquet(file)
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


def tokenize(segments: Segments, tokenizer: Tokenizer, templated: bool = False) -> Example:
    """bos + segments + eos; a chat template writes its own special tokens (bos and eos are added
    only where the rendered text lacks them)."""
    ids: list[int] = []
    trained: list[bool] = []
    piece: list[int] = []
    for text, is_trained in segments:
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_trained] * len(piece)
    if tokenizer.bos_id is not None and not (templated and ids and ids[0] == tokenizer.bos_id):
        ids, trained = [tokenizer.bos_id] + ids, [False] + trained
    if not (templated and tokenizer.eos_id in piece):  # the template's last reply may end with eos itself
        ids.append(tokenizer.eos_id)  # the response ends: learn to stop
        trained.append(True)
    return Example(ids, trained)


def load_examples(path: str, tokenizer: Tokenizer, max_bad_fraction: float,
                  chat_template: bool = True) -> tuple[list[Example], DataReport]:
    """Parse and tokenize every row; bad rows are counted and skipped, too many stop the run."""
    report, examples = DataReport(), []
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))
    for where, row in read_rows(path):
        report.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            examples.append(tokenize(row_segments(row, tokenizer if templated else None), tokenizer, templated))
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
        self._epochs: dict[int, tuple[torch.Tensor, ...]] = {}  # the latest epoch only
        total_tokens = sum(len(e.ids) for e in examples)  # the same in every epoch
        self.sequences_per_epoch = -(-total_tokens // seq_len)

    def _epoch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, position ids), each [sequences, seq_len] int64, of one shuffled pass."""
        if index not in self._epochs:
            order = list(range(len(self.examples)))
            random.Random(self.seed * 1_000_003 + index).shuffle(order)
            ids: list[int] = []
            labels: list[int] = []
            positions: list[int] = []
            for i in order:
                example = self.examples[i]
                ids += example.ids
                labels += [t if keep else IGNORE_INDEX for t, keep in zip(example.ids, example.trained)]
                positions += range(len(example.ids))
            pad = -len(ids) % self.seq_len
            ids += [self.pad_id] * pad
            labels += [IGNORE_INDEX] * pad
            positions += range(pad)  # the padding is a document of its own
            shape = (-1, self.seq_len)
            self._epochs = {index: tuple(torch.tensor(v).view(shape) for v in (ids, labels, positions))}
        return self._epochs[index]

    def epoch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, labels), each [sequences, seq_len] int64, of one shuffled pass over the examples."""
        return self._epoch(index)[:2]

    def sequences(self, start: int, count: int, positions: bool = False) -> tuple[torch.Tensor, ...]:
        """`count` sequences from position `start` of the endless stream of epochs: (ids, labels),
        and their position ids when asked."""
        parts: list[list[torch.Tensor]] = [[], [], []]
        epoch, offset = divmod(start, self.sequences_per_epoch)
        while count > 0:
            tensors = self._epoch(epoch)
            take = min(count, tensors[0].shape[0] - offset)
            for part, tensor in zip(parts, tensors):
                part.append(tensor[offset:offset + take])
            count, offset, epoch = count - take, 0, epoch + 1
        return tuple(torch.cat(part) for part in parts[:3 if positions else 2])

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch of optimizer step `step` (0-based): [global_batch, seq_len] ids and labels."""
        return self.sequences(step * self.global_batch, self.global_batch)

    def position_ids(self, step: int) -> torch.Tensor:
        """The position ids of `batch(step)`: 0 at each document's start (a document cut at the end of
        the previous sequence continues its count)."""
        return self.sequences(step * self.global_batch, self.global_batch, positions=True)[2]
