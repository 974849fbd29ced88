"""Rows as chat messages, formatted by the tokenizer's own chat template (`apply_chat_template`),
with the loss on the assistant turns only.

The trained spans come from rendering the conversation turn by turn: the text the template adds
for an assistant reply is render(messages[:k+1]) minus render(messages[:k], add_generation_prompt),
as TRL's assistant-only loss does for templates without generation markers. A template that does
not render each turn as a prefix of the next cannot be split that way: the row is refused.
"""

from __future__ import annotations

from typing import Any

from executor.rows import ASSISTANT_ROLES, HUMAN_ROLES, BadRow, Segments, alpaca_segments

ROLES = {**{r: "user" for r in HUMAN_ROLES}, **{r: "assistant" for r in ASSISTANT_ROLES}, "system": "system"}


def _message(role: Any, content: Any) -> dict[str, str]:
    if not isinstance(content, str):
        raise BadRow("each turn needs a string content")
    name = ROLES.get(str(role).lower())
    if name is None:
        raise BadRow(f"unknown role {role!r}")
    return {"role": name, "content": content}


def row_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI-style `messages`, ShareGPT `conversations` or an Alpaca row, as role/content messages."""
    if "messages" in row or "conversations" in row:
        turns = row.get("messages", row.get("conversations"))
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise BadRow("'messages' / 'conversations' must be a non-empty list of objects")
        messages = [_message(t.get("role", t.get("from")), t.get("content", t.get("value"))) for t in turns]
    else:
        alpaca_segments(row)  # the same checks as the instruction format
        extra = (row.get("input") or "").strip()
        prompt = row["instruction"] + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant turn to learn from")
    return messages


def chat_segments(row: dict[str, Any], tokenizer: Any) -> Segments:
    """The rendered conversation as (text, trained?) pieces, up to the last assistant turn."""
    messages = row_messages(row)
    segments: Segments = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            prompt = tokenizer.render_chat(messages[:k], add_generation_prompt=True)
            full = tokenizer.render_chat(messages[:k + 1], add_generation_prompt=False)
        except Exception as exc:  # noqa: BLE001 - a template's own error (jinja raise_exception) names the fault
            raise BadRow(f"the chat template refused it: {str(exc).splitlines()[0]}") from None
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise BadRow("the chat template does not render each turn as a prefix of the next; "
                         "use --chat-template false")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, trained) for text, trained in segments if text]
