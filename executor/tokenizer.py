"""Tokenizers: a built-in byte-level one (tests and demos, no files needed) or a local folder
holding a Hugging Face tokenizer (never downloaded: `local_files_only`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from planner.errors import InvalidRequest


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids: 0 pad, 1 bos, 2 eos, bytes at 3..258."""

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    offset: int = 3
    vocab_size: int = 259

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer folder (tokenizer.json / tokenizer.model + config) read with transformers."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise InvalidRequest(f"--tokenizer {path} is not a folder; give a local tokenizer folder or 'bytes'")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise InvalidRequest(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
        self.bos_id = self._tok.bos_token_id
        if self._tok.eos_token_id is None:
            raise InvalidRequest(f"tokenizer {path} has no end-of-sequence token; it cannot mark response ends")
        self.eos_id = int(self._tok.eos_token_id)
        self.pad_id = int(self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(self._tok)
        self.chat_template = getattr(self._tok, "chat_template", None)  # executor/chat.py uses it when set

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_tokenizer(spec: str | None, model_vocab_size: int) -> Tokenizer:
    """`None` or 'bytes' -> the byte tokenizer; otherwise a local folder. Its ids must fit the model."""
    tokenizer: Tokenizer = ByteTokenizer() if spec in (None, "bytes") else HFTokenizer(spec)
    if tokenizer.vocab_size > model_vocab_size:
        raise InvalidRequest(f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
                             f"{model_vocab_size}; use a model with a larger vocab_size or another --tokenizer")
    return tokenizer
