"""The row formats' declarations (`ROW_FORMATS`: the registry's config half), and the checks of a source's
`columns` mapping and marker templates.

schema.py validates with these (`format:` values, `columns` names); the data layer registers each format's
detector and converter under its name (data/formats.py: READERS) and reads rows by these names. The table
of formats in docs/data.md is `formats_table()`'s output.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

MESSAGE_KEYS = (
    "role",
    "content",
)  # the keys of one message in `messages` (and in `prompt` / `completion` lists)
TURN_KEYS = ("from", "value")  # the keys of one ShareGPT turn in `conversations`
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RowFormat:
    """One row format's declaration. The data layer registers its detector and converter under `name`
    (data/formats.py: READERS); detection, the "expected ..." message, the `columns` names and the table of
    docs/data.md (`formats_table`) are derived from ROW_FORMATS."""

    name: str
    required: tuple[str, ...]  # the fields a row needs; a row with all of them (non-null) is detected as this
    optional: tuple[str, ...]  # the other fields it reads
    description: str  # one line, for docs/data.md
    turn_keys: tuple[str, ...] = ()  # the keys inside its lists of turns, which `columns` may map too

    @property
    def fields(self) -> tuple[str, ...]:
        return self.required + self.optional


# The row formats, in detection order (`format: auto` reads a row as the first whose required fields it has).
ROW_FORMATS = (
    RowFormat(
        "messages",
        ("messages",),
        ("tools",),
        "OpenAI-style chat: a list of `{role, content}` messages",
        MESSAGE_KEYS,
    ),
    RowFormat(
        "sharegpt",
        ("conversations",),
        ("system", "tools"),
        "FastChat / ShareGPT dumps: a list of `{from, value}` turns",
        TURN_KEYS,
    ),
    RowFormat(
        "prompt_completion",
        ("prompt", "completion"),
        ("tools",),
        "one prompt, one answer (each a string or a list of messages)",
        MESSAGE_KEYS,
    ),
    RowFormat(
        "alpaca",
        ("instruction", "output"),
        ("input", "system", "tools"),
        "instruction tuning: user turn `instruction` (+ `\\n\\n` + `input`), assistant turn `output`",
    ),
    RowFormat(
        "dolly",
        ("instruction", "response"),
        ("context",),
        "databricks-dolly-15k: user turn `instruction` (+ `\\n\\n` + `context`), assistant turn `response`",
    ),
    RowFormat(
        "pretokenized",
        ("input_ids",),
        ("labels",),
        "token ids (and labels, -100 = no loss) from your own pipeline",
    ),
    RowFormat(
        "text",
        ("text",),
        ("loss_masking_spans",),
        "plain text, no chat template, with optional inclusive character spans that get no loss",
    ),
)
FORMATS = ("auto",) + tuple(f.name for f in ROW_FORMATS)
# The fields each row format reads (data/formats.py; docs/data.md), the required ones first; a source's
# `columns` renames its own fields onto these names.
ROW_FIELDS = {f.name: f.fields for f in ROW_FORMATS}
REQUIRED_FIELDS = {f.name: len(f.required) for f in ROW_FORMATS}


def _column_names(fmt: str) -> tuple[str, ...]:
    """The names `columns` may map for a source of format `fmt`."""
    if fmt == "auto":
        return (
            tuple(dict.fromkeys(f for fields in ROW_FIELDS.values() for f in fields))
            + MESSAGE_KEYS
            + TURN_KEYS
        )
    row_format = next(f for f in ROW_FORMATS if f.name == fmt)
    return row_format.fields + row_format.turn_keys


def expected_formats() -> str:
    """The fields that make each format detectable, in detection order: `'messages', ... or 'text'`."""
    names = ["+".join(f"'{n}'" for n in f.required) for f in ROW_FORMATS]
    return "expected " + ", ".join(names[:-1]) + " or " + names[-1]


def formats_table() -> str:
    """The Markdown table of the row formats for docs/data.md (a test checks the file holds it)."""
    rows = [
        "| format | required fields (detected by, in this order) | optional fields | what it is |",
        "|---|---|---|---|",
    ]
    for f in ROW_FORMATS:
        code = lambda names: ", ".join(f"`{n}`" for n in names) or "-"
        rows.append(f"| `{f.name}` | {code(f.required)} | {code(f.optional)} | {f.description} |")
    return "\n".join(rows)


def check_markers(response_template: str | None, instruction_template: str | None) -> str | None:
    """An instruction template needs a response template, and differs from it."""
    if instruction_template is not None and response_template is None:
        raise ValueError(
            "instruction_template needs a response_template (the marker after which text is trained)"
        )
    if instruction_template is not None and instruction_template == response_template:
        raise ValueError(
            f"instruction_template and response_template are the same ({response_template!r}); "
            "they must differ"
        )
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
            raise ValueError(
                f"columns: {theirs!r} is mapped to {' and '.join(twice)}; a field can be renamed once"
            )
    return columns


def sources_shorthand(value: Any) -> Any:
    """`x.jsonl` -> `[{path: x.jsonl}]`; a list's bare paths -> `{path: ...}` (anything else unchanged)."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value
