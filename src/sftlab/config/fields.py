"""The row formats' field names, and the checks of a source's `columns` mapping and marker templates.

schema.py validates with these; the data layer reads rows by these names (docs/data.md).
"""

from __future__ import annotations

import difflib
from typing import Any

FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text", "pretokenized")
# The fields each row format reads (data/formats.py; docs/data.md), the first ones required; a source's
# `columns` renames its own fields onto these names.
ROW_FIELDS = {
    "messages": ("messages", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "prompt_completion": ("prompt", "completion", "tools"),
    "alpaca": ("instruction", "output", "input", "system", "tools"),
    "text": ("text", "loss_masking_spans"),
    "pretokenized": ("input_ids", "labels"),
}
REQUIRED_FIELDS = {"messages": 1, "sharegpt": 1, "prompt_completion": 2, "alpaca": 2, "text": 1, "pretokenized": 1}
MESSAGE_KEYS = ("role", "content")  # the keys of one message in `messages` (and in `prompt` / `completion` lists)
TURN_KEYS = ("from", "value")  # the keys of one ShareGPT turn in `conversations`
ROLES = ("system", "user", "assistant", "tool")


def _column_names(fmt: str) -> tuple[str, ...]:
    """The names `columns` may map for a source of format `fmt`."""
    if fmt == "auto":
        return tuple(dict.fromkeys(f for fields in ROW_FIELDS.values() for f in fields)) + MESSAGE_KEYS + TURN_KEYS
    inner = {"messages": MESSAGE_KEYS, "prompt_completion": MESSAGE_KEYS, "sharegpt": TURN_KEYS}.get(fmt, ())
    return ROW_FIELDS[fmt] + inner


def check_markers(response_template: str | None, instruction_template: str | None) -> str | None:
    """An instruction template needs a response template, and differs from it."""
    if instruction_template is not None and response_template is None:
        raise ValueError("instruction_template needs a response_template (the marker after which text is trained)")
    if instruction_template is not None and instruction_template == response_template:
        raise ValueError(f"instruction_template and response_template are the same ({response_template!r}); "
                         "they must differ")
    return instruction_template


def check_columns(columns: dict[str, str], fmt: str = "auto") -> dict[str, str]:
    """A `columns` mapping names fields of the format (or of any format for auto), each renamed once."""
    allowed = _column_names(fmt)
    for name, theirs in columns.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            of = "any format" if fmt == "auto" else f"format {fmt}"
            raise ValueError(f"columns.{name}: not a field of {of} (those are: {', '.join(allowed)}){hint}")
        if not theirs:
            raise ValueError(f"columns.{name}: empty field name")
    for theirs in set(columns.values()):
        twice = [k for k, v in columns.items() if v == theirs]
        if len(twice) > 1 and not set(twice) <= set(MESSAGE_KEYS + TURN_KEYS):
            raise ValueError(f"columns: {theirs!r} is mapped to {' and '.join(twice)}; a field can be renamed once")
    return columns


def sources_shorthand(value: Any) -> Any:
    """`x.jsonl` -> `[{path: x.jsonl}]`; a list's bare paths -> `{path: ...}` (anything else unchanged)."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value
