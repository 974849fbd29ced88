"""Typed access to a Hugging Face config.json (one-line errors naming the key to fix) and the
fields every Llama-like decoder config shares."""

from __future__ import annotations

from typing import Any

from planner.errors import InvalidRequest


class Config:
    """Typed access to a config.json with one-line errors naming the key to fix."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def int(self, *keys: str, default: int | None = None) -> int:
        for key in keys:
            if self.data.get(key) is not None:
                value = self.data[key]
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise InvalidRequest(f"{self.where}: {key} must be a positive integer, got {value!r}")
                return value
        if default is None:
            raise InvalidRequest(f"{self.where}: missing {' or '.join(keys)} in config.json")
        return default

    def count(self, key: str, default: int) -> int:
        """A non-negative whole number (a layer count, an index; 0 allowed)."""
        value = self.data.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidRequest(f"{self.where}: {key} must be a whole number >= 0, got {value!r}")
        return value

    def int_list(self, key: str, default: list[int] | None = None) -> list[int] | None:
        """A list of whole numbers (layer indices, 0/1 flags), or `default` when absent or null."""
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            raise InvalidRequest(f"{self.where}: {key} must be a list of whole numbers >= 0, got {value!r}")
        return value

    def str_list(self, key: str, choices: tuple[str, ...]) -> list[str] | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or any(v not in choices for v in value):
            raise InvalidRequest(f"{self.where}: {key} must list only {', '.join(choices)}; got {value!r}")
        return value


    def float(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise InvalidRequest(f"{self.where}: {key} must be a finite non-negative number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidRequest(f"{self.where}: {key} must be true or false, got {value!r}")
        return value


def llama_like(c: Config) -> dict[str, Any]:
    """LlamaConfig / MistralConfig / Qwen2Config / MixtralConfig fields (transformers defaults)."""
    hidden = c.int("hidden_size")
    heads = c.int("num_attention_heads")
    attention_bias = c.bool("attention_bias", False)  # Llama: on q, k, v and o together
    fields: dict[str, Any] = dict(
        hidden_size=hidden, num_layers=c.int("num_hidden_layers"), num_heads=heads,
        num_kv_heads=c.int("num_key_value_heads", default=heads),
        head_dim=c.int("head_dim", default=max(hidden // heads, 1)),
        intermediate_size=c.int("intermediate_size"), vocab_size=c.int("vocab_size"),
        max_position_embeddings=c.int("max_position_embeddings", default=4096),
        tie_word_embeddings=c.bool("tie_word_embeddings", False), activation=str(c.data.get("hidden_act", "silu")),
        qkv_bias=attention_bias, out_bias=attention_bias, mlp_bias=c.bool("mlp_bias", False),
        dropout=c.float("attention_dropout", 0.0),
    )
    return fields
