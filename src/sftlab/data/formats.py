"""Normalise one raw row (a dict read from any source) into a record the tokenizer can take.

Row formats, detected per row (`format: auto`) or forced per source (`format: <name>`):

- `messages`: OpenAI-style `[{"role", "content"}]`, roles system/user/assistant/tool, optional
  `tool_calls` on assistant turns and an optional `tools` column for the chat template (a JSON string of the
  list is parsed; bare function schemas are wrapped as `{"type": "function", "function": ...}`; null entries at
  any depth of both are absent, Arrow pads with None: toolcalls.py); their rendering is checked (tool_support.py).
- `prompt_completion`: `prompt` and `completion`, each a string or a list of messages.
- `alpaca`: `instruction`, optional `input`, `output` (optional `system`); the user turn is
  `instruction + "\\n\\n" + input` when `input` is non-empty, else `instruction`.
- `sharegpt`: `conversations: [{"from", "value"}]`; `from` is human/gpt/system (also user,
  assistant, tool, observation/function_response -> tool); optional `system`, `tools`. A
  `function_call` turn's value is JSON `{"name", "arguments"}` (or a list of them): it becomes an
  assistant message's `tool_calls` (toolcalls.py), joined to the assistant turn right before it
  when there is one (text then calls: one turn), so its target is what the template writes for calls.
- `text`: plain text, no chat template, optional `loss_masking_spans`: inclusive character
  spans `[start, end]` whose tokens get no loss; every other token is a target. With a response
  template (`data.response_template`, markers.py) the spans before and between the answers are
  added to them (a union); a text without the marker is a bad row.
- `pretokenized`: `input_ids` (and optional `labels`, -100 = no loss; default: every token).

The first four become a `Conversation`, `text` a `TextRecord`, `pretokenized` a `TokenRecord`.
Every unusable row raises `BadRecord` naming the source, line (JSONL) or row number (others; both
1-based), the field and the reason; a row that fits no format names the closest one and what it lacks
(fields.py). A row with an image content part raises `ImageRow` (a BadRecord), which reading.py
gathers into one error for its source.

A source's `ColumnMap` (fields.py: its `columns` and `roles` settings) first renames the row's
own fields onto these names (`question` -> `prompt`), the keys inside its message lists (`from` ->
`role`) and its role names (`human` -> `user`). Every record carries the format it was read as and
the row's `unknown` fields: those no reader of that format looks at (reported, never an error).
The row schema is documented in docs/data.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from sftlab.config.fields import MESSAGE_KEYS, ROLES, TURN_KEYS
from sftlab.data.fields import (
    NO_COLUMNS,
    SHAREGPT_ROLES,
    ColumnMap,
    detect_format,
    mapping_hint,
    no_format_message,
    unknown_fields,
)
from sftlab.data.markers import TextMarkers, no_loss_spans
from sftlab.data.toolcalls import function_calls, without_nulls, wrapped_tools
from sftlab.data.types import IGNORE_INDEX, BadRecord, ImageRow

__all__ = [
    "NO_COLUMNS", "SHAREGPT_ROLES", "BadRecord", "ColumnMap", "Conversation", "Record", "TextRecord", "TokenRecord",
    "detect_format", "formatted_row", "iter_jsonl", "no_format_message", "to_record", "unknown_fields",
]

@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    source: str = ""
    line: int = 0
    tools: list[dict[str, Any]] | None = None
    unit: str = "line"
    format: str = "messages"  # the row format it was read as
    unknown: tuple[str, ...] = ()  # the row's fields that the format does not read (ignored)
    images: tuple[Any, ...] = ()  # image references (paths or in-memory images), in order (data/images.py)


@dataclass
class TextRecord:
    """Plain text; characters inside `spans` (inclusive [start, end]) carry no loss."""

    text: str
    spans: list[tuple[int, int]]
    source: str = ""
    line: int = 0
    unit: str = "line"
    format: str = "text"
    unknown: tuple[str, ...] = ()


@dataclass
class TokenRecord:
    """Already tokenized ids with aligned labels (IGNORE_INDEX where no loss)."""

    input_ids: list[int]
    labels: list[int]
    source: str = ""
    line: int = 0
    unit: str = "line"
    format: str = "pretokenized"
    unknown: tuple[str, ...] = ()


Record = Union[Conversation, TextRecord, TokenRecord]


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; bad lines are yielded as BadRecord."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as e:
                yield lineno, BadRecord(str(path), lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, BadRecord(str(path), lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")


class _Row:
    """One row (under the format's field names) plus where it came from and how its fields were
    renamed, so every check can raise a precise BadRecord naming the field as the source does."""

    def __init__(self, row: dict[str, Any], source: str, line: int, unit: str, cmap: ColumnMap = NO_COLUMNS):
        self.row, self.source, self.line, self.unit, self.cmap = row, source, line, unit, cmap

    def bad(self, field_name: str | None, reason: str, kind: type[BadRecord] = BadRecord) -> BadRecord:
        if field_name and self.cmap.columns:  # `messages[0].role` as the source names it: `conversations[0].from`
            head, bracket, rest = field_name.partition("[")
            parts = (self.cmap.theirs(head) + bracket + rest).split(".")
            inner = TURN_KEYS if head == "conversations" else MESSAGE_KEYS
            field_name = ".".join(parts[:1] + [self.cmap.theirs(p) if p in inner else p for p in parts[1:]])
        return kind(self.source, self.line, field_name, reason, self.unit)

    def get(self, key: str, kind: type | tuple[type, ...] | None = None, required: bool = True) -> Any:
        value = self.row.get(key)
        if value is None:
            if required:
                raise self.bad(key, "missing")
            return None
        if kind is not None and not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.bad(key, f"must be {names}, got {type(value).__name__}")
        return value


def _check_messages(r: _Row, messages: Any, field_name: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise r.bad(field_name, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise r.bad(where, f"must be an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role is None:
            raise r.bad(f"{where}.role", "missing")
        if role not in ROLES:
            raise r.bad(f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)}; "
                                         f"map other names in the source's `roles`, e.g. roles: {{{role}: assistant}})")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise r.bad(f"{where}.content", "missing")
        if isinstance(content, list):  # OpenAI/HF content parts: text parts joined as the templates render them
            m = {**m, "content": _joined_text_parts(r, content, f"{where}.content")}
            content = m["content"]
        if content is not None and not isinstance(content, str):
            raise r.bad(f"{where}.content", f"must be a string or a list of content parts, got {type(content).__name__}")
        if role in ("user", "assistant") and not (content or "").strip() and not m.get("tool_calls"):
            raise r.bad(f"{where}.content", f"empty {role} message")
        out.append({k: without_nulls(v) if k == "tool_calls" else v for k, v in m.items() if v is not None})
    return out


IMAGE_PARTS = ("image", "image_url", "input_image")
MEDIA_FIELDS = ("images", "videos", "audios")  # LLaMA-Factory's multimodal columns (`<image>` markers in the text)


def _joined_text_parts(r: _Row, parts: list, where: str) -> str:
    """`[{"type": "text", "text": ...}, ...]` -> the texts joined (what text templates render of parts);
    LLaMA-Factory v1 files name the text `value` (`{"type": "text", "value": ...}`), read the same.
    An image part is an `ImageRow`: this model path trains text only (reading.py makes the source's
    image rows one error)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text", part.get("value")) if kind == "text" else None
        if isinstance(text, str):
            texts.append(text)
        elif kind in IMAGE_PARTS:
            raise r.bad(f"{where}[{j}]", f"an {kind} part: images need a vision-language model, and this run "
                                         "trains a text-only model (drop the image parts, or the rows)", ImageRow)
        else:
            raise r.bad(f"{where}[{j}]", "must be a content part {\"type\": \"text\", \"text\": \"...\"}, got "
                                         f"{str(part)[:60]}")
    return "".join(texts)


def _sharegpt_messages(r: _Row) -> list[dict[str, Any]]:
    turns = r.get("conversations", list)
    messages = []
    system = r.get("system", str, required=False)
    if system and system.strip():
        messages.append({"role": "system", "content": system})
    for i, t in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise r.bad(where, f"must be an object with 'from' and 'value', got {type(t).__name__}")
        sender = _sender(t)
        if sender is None:
            raise r.bad(f"{where}.from", "missing")
        role = SHAREGPT_ROLES.get(sender)
        if role is None:
            raise r.bad(f"{where}.from", f"unknown role {sender!r} (expected one of {', '.join(SHAREGPT_ROLES)}; "
                                         f"map other names in the source's `roles`, e.g. roles: {{{sender}: assistant}})")
        value = t.get("value") if t.get("value") is not None else t.get("content")
        if value is None:
            raise r.bad(f"{where}.value", "missing")
        if not isinstance(value, str):
            raise r.bad(f"{where}.value", f"must be a string, got {type(value).__name__}")
        if sender != "function_call":
            messages.append({"role": role, "content": value})
            continue
        try:
            calls = function_calls(value)
        except ValueError as e:
            raise r.bad(f"{where}.value", str(e)) from None
        # the calls join the assistant turn right before (its text, or calls made in parallel), else open one
        if i and messages[-1]["role"] == "assistant" and SHAREGPT_ROLES.get(_sender(turns[i - 1])) == "assistant":
            messages[-1]["tool_calls"] = messages[-1].get("tool_calls", []) + calls
        else:
            messages.append({"role": "assistant", "tool_calls": calls})
    return _check_messages(r, messages, "conversations")


def _sender(turn: dict[str, Any]) -> Any:
    return turn.get("from") if turn.get("from") is not None else turn.get("role")


def _alpaca_messages(r: _Row) -> list[dict[str, Any]]:
    instruction = r.get("instruction", str)
    extra = r.get("input", str, required=False) or ""
    output = r.get("output", str)
    if not instruction.strip():
        raise r.bad("instruction", "empty")
    if not output.strip():
        raise r.bad("output", "empty")
    system = r.get("system", str, required=False)
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _prompt_completion_messages(r: _Row) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = r.get(key, (str, list))
        if isinstance(value, str):
            if not value.strip():
                raise r.bad(key, f"empty {key}")
            messages.append({"role": role, "content": value})
        else:
            messages.extend(_check_messages(r, value, key))
    return messages


def _tools(r: _Row) -> list[dict[str, Any]] | None:
    tools = r.get("tools", (list, str), required=False)
    if isinstance(tools, str):  # ShareGPT exports often store the tool list as a JSON string
        if not tools.strip():
            return None
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise r.bad("tools", f"invalid JSON string: {e.msg}") from None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise r.bad("tools", "must be a list of tool objects")
    return wrapped_tools(without_nulls(tools)) if tools else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _text_record(r: _Row, markers: TextMarkers | None = None) -> TextRecord:
    text = r.get("text", str)
    if not text:
        raise r.bad("text", "empty")
    raw = r.get("loss_masking_spans", list, required=False) or []
    spans = []
    for i, span in enumerate(raw):
        where = f"loss_masking_spans[{i}]"
        if not (isinstance(span, (list, tuple)) and len(span) == 2 and all(_is_int(x) for x in span)):
            raise r.bad(where, f"must be a pair of integers [start, end], got {span!r}")
        start, end = span
        if not 0 <= start <= end < len(text):
            raise r.bad(where, f"span [{start}, {end}] is out of range for a text of {len(text)} characters "
                               "(inclusive spans need 0 <= start <= end < length)")
        spans.append((start, end))
    if markers is not None:
        try:
            spans += no_loss_spans(text, markers)
        except ValueError as e:
            raise r.bad("text", str(e)) from None
    return TextRecord(text, sorted(spans), r.source, r.line, r.unit)


def _token_record(r: _Row, vocab_size: int | None) -> TokenRecord:
    ids = r.get("input_ids", list)
    if not ids:
        raise r.bad("input_ids", "empty")
    labels = r.get("labels", list, required=False)
    if labels is not None and len(labels) != len(ids):
        raise r.bad("labels", f"has {len(labels)} entries but input_ids has {len(ids)}")
    for name, values, allowed in (("input_ids", ids, ()), ("labels", labels or [], (IGNORE_INDEX,))):
        for i, x in enumerate(values):
            if not _is_int(x):
                raise r.bad(f"{name}[{i}]", f"must be an integer, got {type(x).__name__}")
            if x in allowed:
                continue
            if x < 0 or (vocab_size is not None and x >= vocab_size):
                raise r.bad(f"{name}[{i}]", f"token id {x} is outside the vocabulary (size {vocab_size})")
    return TokenRecord(list(ids), list(labels) if labels is not None else list(ids), r.source, r.line, r.unit)


def formatted_row(func: Any, row: Any, source: str, line: int, unit: str = "line") -> dict[str, Any]:
    """A row through the Python API's `formatting_func` (TRL's): its result, a text (str), a list of
    messages or a dict of a row format (e.g. {prompt, completion}), as a row; anything else, or an
    exception raised by the function, is a BadRecord naming formatting_func."""
    try:
        out = func(row)
    except Exception as e:  # noqa: BLE001 - the user's function: reported per row, the run goes on
        raise BadRecord(source, line, "formatting_func", f"raised {type(e).__name__}: {e}", unit) from None
    if isinstance(out, str):
        return {"text": out}
    if isinstance(out, list) and out and all(isinstance(m, str) for m in out):
        raise BadRecord(source, line, "formatting_func", "returned a list of strings: it is called on one row "
                        "at a time and returns one text, a list of messages or a dict", unit)
    if isinstance(out, list):
        return {"messages": out}
    if isinstance(out, dict):
        return out
    raise BadRecord(source, line, "formatting_func", f"returned {type(out).__name__}; expected a text (str), a list "
                    "of messages or a dict such as {prompt, completion}", unit)


def to_record(row: Any, fmt: str, source: str, line: int, *, unit: str = "line",
              vocab_size: int | None = None, columns: ColumnMap | None = None,
              markers: TextMarkers | None = None) -> Record:
    """Normalise one parsed row into a Conversation, TextRecord or TokenRecord, or raise BadRecord.

    `unit` is "line" (JSONL line number) or "row" (row number in an array, table or dataset), both 1-based;
    `vocab_size` bounds the ids of pretokenized rows; `columns` renames the row's fields first;
    `markers` (the response/instruction templates) add no-loss spans to text rows.
    """
    if not isinstance(row, dict):
        raise BadRecord(source, line, None, f"row must be a JSON object, got {type(row).__name__}", unit)
    cmap = columns or NO_COLUMNS
    r = _Row(cmap.apply(row), source, line, unit, cmap)
    if (media := next((k for k in MEDIA_FIELDS if r.row.get(k)), None)) is not None:  # LLaMA-Factory's columns
        raise r.bad(media, f"{media} need a multimodal model, and this run trains a text-only model", ImageRow)
    try:
        try:
            read_as = detect_format(r.row) if fmt == "auto" else fmt
        except KeyError:
            raise r.bad(None, no_format_message(r.row, cmap, row)) from None
        record = _text_record(r, markers) if read_as == "text" else _record(r, read_as, vocab_size)
    except BadRecord as e:
        raise _hinted(e, row, cmap, fmt) from None
    record.format, record.unknown = read_as, unknown_fields(row, read_as, cmap)
    return record


def _hinted(e: BadRecord, row: dict[str, Any], cmap: ColumnMap, fmt: str) -> BadRecord:
    """A missing field or an undetectable row of a source with `columns`: the reason plus how the mapping
    does not fit the row and its fix (fields.mapping_hint)."""
    if e.reason != "missing" and not e.reason.startswith("cannot detect the row format"):
        return e
    hint = mapping_hint(row, cmap, fmt, with_keys=e.reason == "missing")
    return BadRecord(e.source, e.line, e.field_name, f"{e.reason}; {hint}", e.unit) if hint else e


def _record(r: _Row, fmt: str, vocab_size: int | None) -> Record:
    if fmt == "pretokenized":
        return _token_record(r, vocab_size)
    if fmt == "messages":
        messages = _check_messages(r, r.get("messages"), "messages")
    elif fmt == "prompt_completion":
        messages = _prompt_completion_messages(r)
    elif fmt == "alpaca":
        messages = _alpaca_messages(r)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(r)
    else:
        raise r.bad(None, f"unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in messages):
        raise r.bad("conversations" if fmt == "sharegpt" else "messages", "no assistant turn to learn from")
    return Conversation(messages=messages, source=r.source, line=r.line, tools=_tools(r), unit=r.unit)
