"""Normalise one raw row (a dict read from any source) into a record the tokenizer can take.

Row formats, detected per row (`format: auto`) or forced per source (`format: <name>`), are one
registry: each format's name, fields, required fields and description are declared at the config
layer (config/fields.py: ROW_FORMATS, in detection order); here each gets its detector and its
converter (`READERS`: a row of that format -> a record). Detection (`detect_format`), the message for
a row that fits no format (fields.py) and the `columns` names are derived from it; docs/data.md's table
of formats is `config.fields.formats_table()`. The chat formats' converters are chat_rows.py's:

- `messages`, `prompt_completion`, `alpaca`, `dolly`, `sharegpt`: a `Conversation` (chat_rows.py).
- `text`: plain text, no chat template, optional `loss_masking_spans`: inclusive character
  spans `[start, end]` whose tokens get no loss; every other token is a target. With a response
  template (`data.response_template`, markers.py) the spans before and between the answers are
  added to them (a union); a text without the marker is a bad row.
- `pretokenized`: `input_ids` (and optional `labels`, -100 = no loss; default: every token).

Adding a row format: a `RowFormat` in config.fields.ROW_FORMATS and its `Reader` in `READERS`
(docs/architecture.md).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from sftlab.config.fields import ROW_FORMATS
from sftlab.data.chat_rows import (
    alpaca_messages,
    check_messages,
    dolly_messages,
    prompt_completion_messages,
    row_tools,
    sharegpt_messages,
)
from sftlab.data.fields import (
    NO_COLUMNS,
    SHAREGPT_ROLES,
    ColumnMap,
    Row,
    mapping_hint,
    no_format_message,
    unknown_fields,
)
from sftlab.data.markers import TextMarkers, no_loss_spans
from sftlab.data.types import IGNORE_INDEX, BadRecord, ImageRow

__all__ = [
    "NO_COLUMNS",
    "SHAREGPT_ROLES",
    "BadRecord",
    "ColumnMap",
    "Conversation",
    "Record",
    "TextRecord",
    "TokenRecord",
    "READERS",
    "detect_format",
    "formatted_row",
    "no_format_message",
    "to_record",
    "unknown_fields",
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


MEDIA_FIELDS = (
    "images",
    "videos",
    "audios",
)  # LLaMA-Factory's multimodal columns (`<image>` markers in the text)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _text_record(r: Row, markers: TextMarkers | None = None) -> TextRecord:
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
            raise r.bad(
                where,
                f"span [{start}, {end}] is out of range for a text of {len(text)} characters "
                "(inclusive spans need 0 <= start <= end < length)",
            )
        spans.append((start, end))
    if markers is not None:
        try:
            spans += no_loss_spans(text, markers)
        except ValueError as e:
            raise r.bad("text", str(e)) from None
    return TextRecord(text, sorted(spans), r.source, r.line, r.unit)


def _token_record(r: Row, vocab_size: int | None) -> TokenRecord:
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
        raise BadRecord(
            source,
            line,
            "formatting_func",
            "returned a list of strings: it is called on one row "
            "at a time and returns one text, a list of messages or a dict",
            unit,
        )
    if isinstance(out, list):
        return {"messages": out}
    if isinstance(out, dict):
        return out
    raise BadRecord(
        source,
        line,
        "formatting_func",
        f"returned {type(out).__name__}; expected a text (str), a list "
        "of messages or a dict such as {prompt, completion}",
        unit,
    )


def to_record(
    row: Any,
    fmt: str,
    source: str,
    line: int,
    *,
    unit: str = "line",
    vocab_size: int | None = None,
    columns: ColumnMap | None = None,
    markers: TextMarkers | None = None,
) -> Record:
    """Normalise one parsed row into a Conversation, TextRecord or TokenRecord, or raise BadRecord.

    `unit` is "line" (JSONL line number) or "row" (row number in an array, table or dataset), both 1-based;
    `vocab_size` bounds the ids of pretokenized rows; `columns` renames the row's fields first;
    `markers` (the response/instruction templates) add no-loss spans to text rows.
    """
    if not isinstance(row, dict):
        raise BadRecord(source, line, None, f"row must be a JSON object, got {type(row).__name__}", unit)
    cmap = columns or NO_COLUMNS
    r = Row(cmap.apply(row), source, line, unit, cmap)
    if (
        media := next((k for k in MEDIA_FIELDS if r.row.get(k)), None)
    ) is not None:  # LLaMA-Factory's columns
        raise r.bad(
            media, f"{media} need a multimodal model, and this run trains a text-only model", ImageRow
        )
    try:
        try:
            read_as = detect_format(r.row) if fmt == "auto" else fmt
        except KeyError:
            raise r.bad(None, no_format_message(r.row, cmap, row)) from None
        if read_as not in READERS:
            raise r.bad(None, f"unknown format {fmt!r}")
        record = READERS[read_as].convert(r, vocab_size, markers)
    except BadRecord as e:
        raise _hinted(e, row, cmap, fmt) from None
    record.format, record.unknown = read_as, unknown_fields(row, read_as, cmap)
    return record


def _hinted(e: BadRecord, row: dict[str, Any], cmap: ColumnMap, fmt: str) -> BadRecord:
    """A missing field or an undetectable row of a source with `columns`: the reason plus how the mapping
    does not fit the row and its fix (fields.mapping_hint)."""
    if e.reason != "missing" and not e.reason.startswith("cannot detect the row format"):
        return e
    hint = mapping_hint(row, cmap, _detected(row), fmt, with_keys=e.reason == "missing")
    return BadRecord(e.source, e.line, e.field_name, f"{e.reason}; {hint}", e.unit) if hint else e


Convert = Callable[[Row, Union[int, None], Union[TextMarkers, None]], Record]


@dataclass(frozen=True)
class Reader:
    """A row format's data half (its declaration: config.fields.RowFormat of the same name). `detect(row)`:
    whether a row (under the format's names) is of this format (`format: auto` asks the formats in
    ROW_FORMATS order); `convert(row, vocab_size, markers)`: the row as a record, or a BadRecord raised."""

    detect: Callable[[dict[str, Any]], bool]
    convert: Convert


def has_required(fmt: str) -> Callable[[dict[str, Any]], bool]:
    """The usual detector: the row has every required field of `fmt` (null counts as absent)."""
    required = next(f.required for f in ROW_FORMATS if f.name == fmt)
    return lambda row: all(row.get(name) is not None for name in required)


def _chat(
    messages: Callable[[Row], list[dict[str, Any]]], turns_field: str = "messages", tools: bool = True
) -> Convert:
    """A chat format's converter: its messages (chat_rows.py), at least one of them the assistant's."""

    def convert(r: Row, vocab_size: int | None, markers: TextMarkers | None) -> Conversation:
        out = messages(r)
        if not any(m["role"] == "assistant" for m in out):
            raise r.bad(turns_field, "no assistant turn to learn from")
        return Conversation(
            messages=out, source=r.source, line=r.line, tools=row_tools(r) if tools else None, unit=r.unit
        )

    return convert


# One entry per format of config.fields.ROW_FORMATS (tests/data/test_formats.py checks they match).
READERS: dict[str, Reader] = {
    "messages": Reader(
        has_required("messages"), _chat(lambda r: check_messages(r, r.get("messages"), "messages"))
    ),
    "sharegpt": Reader(has_required("sharegpt"), _chat(sharegpt_messages, "conversations")),
    "prompt_completion": Reader(has_required("prompt_completion"), _chat(prompt_completion_messages)),
    "alpaca": Reader(has_required("alpaca"), _chat(alpaca_messages)),
    "dolly": Reader(has_required("dolly"), _chat(dolly_messages, tools=False)),
    "pretokenized": Reader(
        has_required("pretokenized"), lambda r, vocab_size, markers: _token_record(r, vocab_size)
    ),
    "text": Reader(has_required("text"), lambda r, vocab_size, markers: _text_record(r, markers)),
}


def detect_format(row: dict[str, Any]) -> str:
    """The format of one row from its keys: the first of ROW_FORMATS whose detector takes it; KeyError
    (naming the closest format) when none does."""
    for row_format in ROW_FORMATS:
        if READERS[row_format.name].detect(row):
            return row_format.name
    raise KeyError(no_format_message(row))


def _detected(row: dict[str, Any]) -> str | None:
    try:
        return detect_format(row)
    except KeyError:
        return None
