"""Rows of training data as segments of text, each trained on or not: the Alpaca instruction and
ShareGPT conversation formats (LLaMA2-Accessory's templates). executor/chat.py formats rows with a
tokenizer's chat template instead; executor/data.py picks one per row."""

from __future__ import annotations

from typing import Any


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
