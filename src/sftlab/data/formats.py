"""Read training rows from disk and normalise each one into a conversation.

Every supported row format becomes a `Conversation` (a list of role/content messages).
Each bad row raises `BadRecord` naming the file, line and field; callers decide whether to
skip it (and count it) or stop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


class BadRecord(ValueError):
    """One unusable row: where it is, which field, and why."""

    def __init__(self, source: str, line: int, field_name: str | None, reason: str):
        self.source, self.line, self.field_name, self.reason = source, line, field_name, reason
        where = f"{source}:{line}" + (f" field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {reason}")


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str = ""
    line: int = 0
    tools: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; bad lines raise BadRecord."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, BadRecord(str(path), lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, BadRecord(str(path), lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")


def detect_format(row: dict[str, Any]) -> str:
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    raise KeyError(f"cannot detect the row format from its keys {sorted(row)[:8]}; expected 'messages' or 'prompt'+'completion'")


def _check_messages(messages: Any, source: str, line: int, field_name: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRecord(source, line, field_name, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(source, line, where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise BadRecord(source, line, f"{where}.role", "missing")
        if role not in ROLES:
            raise BadRecord(source, line, f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise BadRecord(source, line, f"{where}.content", "missing")
        if content is not None and not isinstance(content, str):
            raise BadRecord(source, line, f"{where}.content", f"must be a string, got {type(content).__name__}")
        if role == "assistant" and not (content or "").strip() and not m.get("tool_calls"):
            raise BadRecord(source, line, f"{where}.content", "empty assistant message")
        out.append(dict(m))
    return out


def to_conversation(row: Any, fmt: str, source: str, line: int) -> Conversation:
    """Normalise one parsed row into a Conversation, or raise BadRecord."""
    if not isinstance(row, dict):
        raise BadRecord(source, line, None, f"row must be a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        try:
            fmt = detect_format(row)
        except KeyError as e:
            raise BadRecord(source, line, None, str(e.args[0])) from None
    if fmt == "messages":
        if "messages" not in row:
            raise BadRecord(source, line, "messages", "missing")
        messages = _check_messages(row["messages"], source, line, "messages")
    elif fmt == "prompt_completion":
        messages = []
        for key, role in (("prompt", "user"), ("completion", "assistant")):
            value = row.get(key)
            if value is None:
                raise BadRecord(source, line, key, "missing")
            if isinstance(value, str):
                if role == "assistant" and not value.strip():
                    raise BadRecord(source, line, key, "empty completion")
                messages.append({"role": role, "content": value})
            else:
                messages.extend(_check_messages(value, source, line, key))
    else:
        raise BadRecord(source, line, None, f"unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(source, line, "messages", "no assistant turn to learn from")
    return Conversation(messages=messages, source=source, line=line, tools=row.get("tools"))
