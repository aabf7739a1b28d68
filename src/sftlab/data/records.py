"""A row becomes a record: one raw row (a dict read from any source) -> a `Conversation`, a `TextRecord`
or a `TokenRecord` the tokenizer can take, or a `BadRecord` naming where the row is and what is wrong.

Row formats are one registry. Each format's name, fields, required fields and description are declared at
the config layer (config/fields.py: ROW_FORMATS, in detection order); here each gets its `Reader` in
`READERS`: a detector and a converter. `to_record(row, fmt, ...)` renames the row's own field names through
the source's `ColumnMap`, takes its format (`format: <name>`, or `format: auto`: `detect_format`, the first
of ROW_FORMATS whose detector takes the row) and converts it:

- `messages`: OpenAI-style `[{"role", "content"}]`, roles system/user/assistant/tool, optional `tool_calls`
  on assistant turns and an optional `tools` column for the chat template (a JSON string of the list is
  parsed; bare function schemas are wrapped as `{"type": "function", "function": ...}`; null entries at any
  depth of both are absent, Arrow pads with None: toolcalls.py); whether the template renders them is
  checked before tokenizing (rendering.py, `data.tools`). A content given as a list of text parts is joined;
  an image part is an `ImageRow`.
- `prompt_completion`: `prompt` and `completion`, each a string or a list of messages.
- `alpaca`: `instruction`, optional `input`, `output` (optional `system`); the user turn is
  `instruction + "\\n\\n" + input` when `input` is non-empty, else `instruction`.
- `dolly` (databricks-dolly-15k): `instruction`, optional `context`, `response`; read as alpaca reads
  instruction, input and output.
- `sharegpt`: `conversations: [{"from", "value"}]`; `from` is human/gpt/system (also user, assistant, tool,
  observation/function_response -> tool); optional `system`, `tools`. A `function_call` turn's value is JSON
  `{"name", "arguments"}` (or a list of them): it becomes an assistant message's `tool_calls`
  (toolcalls.py), joined to the assistant turn right before it when there is one (text then calls: one
  turn), so its target is what the template writes for calls.
- `text`: plain text, no chat template, optional `loss_masking_spans`: inclusive character spans
  `[start, end]` whose tokens get no loss; every other token is a target. With a response template
  (`data.response_template`, markers.py) the spans before and between the answers are added to them (a
  union); a text without the marker is a bad row.
- `pretokenized`: `input_ids` (and optional `labels`, -100 = no loss; default: every token).

The chat formats' converters give a list of messages, checked by `check_messages`, with at least one
assistant turn; the Python API's `formatting_func` (TRL's) turns a row into one of these first
(`formatted_row`).

A source's `ColumnMap` (its `columns` and `roles` settings) renames the row's own fields onto the format's
names (`question` -> `prompt`), the keys inside its message lists (`from` -> `role`) and its role names
(`human` -> `user`). Every unusable row raises `BadRecord` naming the source, line (JSONL) or row number
(others; both 1-based), the field as the source names it (`Row.bad`: `conversations[0].from`, never the
renamed key) and the reason. A row that fits no format names the closest one and what it lacks
(`no_format_message`); where the source's `columns` do not fit the row, the message says how and the fix
(`mapping_hint`). A row with an image (a content part, or LLaMA-Factory's images/videos/audios columns)
raises `ImageRow` (a BadRecord), which the source's reading gathers into one error (dataset.py). Every
record carries the format it was read as and the row's `unknown` fields: those no reader of that format
looks at (`unknown_fields`: reported, never an error); `ColumnMap.used` / `unused` report the mapping
entries no row used.

Adding a row format: a `RowFormat` in config.fields.ROW_FORMATS and its `Reader` in `READERS`
(docs/architecture.md). The row schema is documented in docs/data.md.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Union

from sftlab.config.fields import (
    MESSAGE_KEYS,
    REQUIRED_FIELDS,
    ROLES,
    ROW_FIELDS,
    ROW_FORMATS,
    TURN_KEYS,
    expected_formats,
)
from sftlab.data.markers import TextMarkers, no_loss_spans
from sftlab.data.toolcalls import function_calls, without_nulls, wrapped_tools
from sftlab.data.types import IGNORE_INDEX, BadRecord, ImageRow

# --- a source's field names: renaming (ColumnMap), precise errors (Row), why a row fits no format ---

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}
LIST_FIELDS = {
    "messages": MESSAGE_KEYS,
    "prompt": MESSAGE_KEYS,
    "completion": MESSAGE_KEYS,
    "conversations": TURN_KEYS,
}  # fields holding turns -> the keys of a turn


def _rename(d: dict[str, Any], ours_to_theirs: dict[str, str]) -> dict[str, Any]:
    """`d` with each field `theirs` moved to `ours`; a field already named `ours` but mapped from
    elsewhere is dropped (the mapped one wins)."""
    theirs_to_ours = {t: o for o, t in ours_to_theirs.items()}
    out = {k: v for k, v in d.items() if k not in theirs_to_ours and k not in ours_to_theirs}
    out.update((o, d[t]) for t, o in theirs_to_ours.items() if t in d)
    return out


@dataclass
class ColumnMap:
    """A source's `columns` (format field -> the source's own field, also `role`/`content` inside
    messages and `from`/`value` inside ShareGPT turns) and `roles` (its role name -> role)."""

    columns: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.columns or self.roles)

    def theirs(self, name: str) -> str:
        """What the source calls the format field `name`."""
        return self.columns.get(name, name)

    def apply(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row under the format's field names, message keys and role names."""
        if not self:
            return row
        inner = set(MESSAGE_KEYS + TURN_KEYS)
        out = _rename(row, {o: t for o, t in self.columns.items() if o not in inner})
        for key in ("messages", "prompt", "completion"):
            if isinstance(out.get(key), list):
                out[key] = self._turns(out[key], MESSAGE_KEYS)
        if isinstance(out.get("conversations"), list):
            out["conversations"] = self._turns(out["conversations"], TURN_KEYS)
        return out

    def used(self, row: dict[str, Any]) -> set[str]:
        """The entries of this mapping that the (unrenamed) row uses: `columns.<name>` where the row has the
        field it names (inside its turns for role/content/from/value), `roles.<name>` where a turn has that role."""
        out = {f"columns.{o}" for o, t in self.columns.items() if o not in LIST_KEYS and _has(row, t)}
        for ours, keys in LIST_FIELDS.items():
            turns = row.get(self.theirs(ours))
            inner = {self.columns[k]: k for k in keys if k in self.columns}
            senders = {self.theirs(keys[0]), "role"}
            for t in turns if isinstance(turns, list) else ():
                if isinstance(t, dict):
                    out.update(f"columns.{inner[k]}" for k in t if k in inner)
                    out.update(
                        f"roles.{t[k]}" for k in senders if isinstance(t.get(k), str) and t[k] in self.roles
                    )
        return out

    def unused(self, used: Iterable[str]) -> list[str]:
        """The entries no row used (given those `used` by some row, as `used()` names them), each as the
        config has it and why: `columns: {output: response} (no row has `response`)`."""
        seen = set(used)
        out = [
            f"columns: {{{o}: {t}}} (no {'turn' if o in LIST_KEYS else 'row'} has `{t}`)"
            for o, t in self.columns.items()
            if f"columns.{o}" not in seen
        ]
        return out + [
            f"roles: {{{name}: {role}}} (no turn has the role `{name}`)"
            for name, role in self.roles.items()
            if f"roles.{name}" not in seen
        ]

    def _turns(self, turns: list[Any], keys: tuple[str, str]) -> list[Any]:
        mapping = {k: self.columns[k] for k in keys if k in self.columns}
        if not mapping and not self.roles:
            return turns
        out = []
        for t in turns:
            if isinstance(t, dict):
                t = _rename(t, mapping) if mapping else dict(t)
                for key in (keys[0], "role"):
                    if isinstance(t.get(key), str) and t[key] in self.roles:
                        t[key] = self.roles[t[key]]
            out.append(t)
        return out


NO_COLUMNS = ColumnMap()
LIST_KEYS = set(MESSAGE_KEYS + TURN_KEYS)  # `columns` names that rename keys inside turns


class Row:
    """One row (under the format's field names) plus where it came from and how its fields were
    renamed, so every check can raise a precise BadRecord naming the field as the source does."""

    def __init__(self, row: dict[str, Any], source: str, line: int, unit: str, cmap: ColumnMap = NO_COLUMNS):
        self.row, self.source, self.line, self.unit, self.cmap = row, source, line, unit, cmap

    def bad(self, field_name: str | None, reason: str, kind: type[BadRecord] = BadRecord) -> BadRecord:
        if (
            field_name and self.cmap.columns
        ):  # `messages[0].role` as the source names it: `conversations[0].from`
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


def _has(row: dict[str, Any], key: str) -> bool:
    return row.get(key) is not None  # columnar sources fill absent fields with None


def no_format_message(
    row: dict[str, Any], cmap: ColumnMap = NO_COLUMNS, own: dict[str, Any] | None = None
) -> str:
    """Why a row (under the format's names) fits no format: the row's own keys (`own`: the row as the
    file has it), the closest format (most of its fields present) and what that one lacks, and how to
    map the source's own field names (a source with `columns` gets `mapping_hint` instead)."""
    present = {k for k in row if row[k] is not None}
    keys = sorted(k for k, v in (row if own is None else own).items() if v is not None)[:8]
    expected = expected_formats()
    score = {fmt: len(present & set(fields)) for fmt, fields in ROW_FIELDS.items()}
    best = max(score, key=lambda f: score[f])  # ties: the first in ROW_FIELDS order
    if not score[best]:
        return f"cannot detect the row format from its keys {keys}; {expected}" + (
            ""
            if cmap.columns
            else "; to train on other field names, map them in the source's `columns`, e.g. columns: "
            "{prompt: question, completion: answer} (docs/data.md)"
        )
    missing = [f for f in ROW_FIELDS[best][: REQUIRED_FIELDS[best]] if f not in present]
    lacks = ", ".join(f"'{cmap.theirs(f)}'" for f in missing)
    example = ", ".join(f"{f}: <your field>" for f in missing)
    return (
        f"cannot detect the row format from its keys {keys}; closest format: {best}, which also needs {lacks}"
        + (
            ""
            if cmap.columns
            else f" (or map your own field names in the source's `columns`, e.g. "
            f"columns: {{{example}}}; docs/data.md)"
        )
    )


def _flow(d: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def _turn_notes(row: dict[str, Any], cmap: ColumnMap) -> list[str]:
    """For each mapped field of turns whose turns lack the keys the format reads: their keys, and the
    `columns` (and `roles`) entries that map them."""
    notes = []
    for ours, keys in LIST_FIELDS.items():
        turns, theirs = row.get(cmap.theirs(ours)), cmap.theirs(ours)
        dicts = (
            [t for t in turns if isinstance(t, dict)]
            if ours in cmap.columns and isinstance(turns, list)
            else []
        )
        have = sorted({k for t in dicts for k in t})
        if (
            not dicts
            or all(cmap.theirs(k) in have for k in keys)
            or (ours == "conversations" and set(MESSAGE_KEYS) <= set(have))
        ):
            continue
        if keys == MESSAGE_KEYS and set(TURN_KEYS) <= set(have):  # ShareGPT turns under a messages field
            columns = {**cmap.columns, "role": "from", "content": "value"}
            senders = dict.fromkeys(t["from"] for t in dicts if isinstance(t.get("from"), str))
            roles = {
                **cmap.roles,
                **{s: SHAREGPT_ROLES[s] for s in senders if s in SHAREGPT_ROLES and s not in ROLES},
            }
            fix = f"columns: {_flow(columns)}" + (f" and roles: {_flow(roles)}" if roles else "")
            other = (
                f" (or read them as ShareGPT turns: columns: {{conversations: {theirs}}})"
                if theirs != "conversations"
                else ""
            )
            notes.append(
                f"the turns of `{theirs}` have ShareGPT keys {have}, not {cmap.theirs('role')}/"
                f"{cmap.theirs('content')}: map them too, {fix}{other}"
            )
        else:
            example = _flow({**cmap.columns, keys[0]: "<key of the role>", keys[1]: "<key of the text>"})
            notes.append(
                f"the turns of `{theirs}` have keys {have}, not {cmap.theirs(keys[0])}/"
                f"{cmap.theirs(keys[1])}: map them, columns: {example}"
            )
    return notes


def mapping_hint(
    row: dict[str, Any], cmap: ColumnMap, as_is: str | None, fmt: str = "auto", with_keys: bool = True
) -> str:
    """Why the source's `columns` do not fit `row` (as the file has it), and the fix, or '' where there is
    nothing to say: the row's own keys; an entry `{ours: theirs}` names a field the row lacks (where the
    row has `ours` itself, the entry is not needed: remove it); turns whose keys are left unmapped (ShareGPT
    from/value under `messages`: the entries that map them); and the format the row is read as without
    the mapping (`as_is`: detected from the row as it is, None if none fits) (`with_keys=False`: without the
    keys, for a message that lists them)."""
    if not cmap.columns:
        return ""
    own = [k for k, v in row.items() if v is not None]
    notes = []
    for ours, theirs in cmap.columns.items():
        if ours in LIST_KEYS or _has(row, theirs):
            continue
        if _has(row, ours):
            notes.append(
                f"the row has `{ours}` itself (the format's own name) and no `{theirs}`: the entry "
                f"`{ours}: {theirs}` reads {ours} from {theirs}; remove it from `columns`"
            )
        else:
            close = difflib.get_close_matches(theirs, own, n=1, cutoff=0.6)
            notes.append(
                f"the row has no `{theirs}`"
                + (f"; did you mean columns: {{{ours}: {close[0]}}}?" if close else "")
            )
    notes += _turn_notes(row, cmap)
    as_is = as_is if notes else None
    if as_is and fmt in ("auto", as_is):
        how = "auto-detection reads the row" if fmt == "auto" else "the row is read"
        notes.append(f"without the `columns` mapping, {how} as {as_is}, its fields as they are")
    elif as_is:
        notes.append(
            f"without the `columns` mapping and with format: auto (or {as_is}), the row is read as {as_is}"
        )
    keys = f"the row's own keys: {sorted(own)[:8]}; " if with_keys else ""
    return keys + "; ".join(notes) if notes else ""


def unknown_fields(row: dict[str, Any], fmt: str, cmap: ColumnMap = NO_COLUMNS) -> tuple[str, ...]:
    """The row's fields (as the source names them) that format `fmt` does not read; ShareGPT turn keys
    other than from/value (or role/content) as `conversations[].<key>`."""
    known = {cmap.theirs(f) for f in ROW_FIELDS[fmt]}
    out = [k for k, v in row.items() if v is not None and k not in known]
    turns = row.get(cmap.theirs("conversations")) if fmt == "sharegpt" else None
    if isinstance(turns, list):
        seen = {cmap.theirs(k) for k in TURN_KEYS} | {"role", "content"}
        extra = {
            k for t in turns if isinstance(t, dict) for k, v in t.items() if v is not None and k not in seen
        }
        out += [f"{cmap.theirs('conversations')}[].{k}" for k in sorted(extra)]
    return tuple(out)


# --- the chat formats' converters: a row -> its checked messages, and its tools ---


def check_messages(r: Row, messages: Any, field_name: str) -> list[dict[str, Any]]:
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
            raise r.bad(
                f"{where}.role",
                f"unknown role {role!r} (expected one of {', '.join(ROLES)}; "
                f"map other names in the source's `roles`, e.g. roles: {{{role}: assistant}})",
            )
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise r.bad(f"{where}.content", "missing")
        if isinstance(
            content, list
        ):  # OpenAI/HF content parts: text parts joined as the templates render them
            m = {**m, "content": _joined_text_parts(r, content, f"{where}.content")}
            content = m["content"]
        if content is not None and not isinstance(content, str):
            raise r.bad(
                f"{where}.content",
                f"must be a string or a list of content parts, got {type(content).__name__}",
            )
        if role in ("user", "assistant") and not (content or "").strip() and not m.get("tool_calls"):
            raise r.bad(f"{where}.content", f"empty {role} message")
        out.append({k: without_nulls(v) if k == "tool_calls" else v for k, v in m.items() if v is not None})
    return out


IMAGE_PARTS = ("image", "image_url", "input_image")


def _joined_text_parts(r: Row, parts: list, where: str) -> str:
    """`[{"type": "text", "text": ...}, ...]` -> the texts joined (what text templates render of parts);
    LLaMA-Factory v1 files name the text `value` (`{"type": "text", "value": ...}`), read the same.
    An image part is an `ImageRow`: this model path trains text only (dataset.py makes the source's
    image rows one error)."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text", part.get("value")) if kind == "text" else None
        if isinstance(text, str):
            texts.append(text)
        elif kind in IMAGE_PARTS:
            raise r.bad(
                f"{where}[{j}]",
                f"an {kind} part: images need a vision-language model, and this run "
                "trains a text-only model (drop the image parts, or the rows)",
                ImageRow,
            )
        else:
            raise r.bad(
                f"{where}[{j}]",
                f'must be a content part {{"type": "text", "text": "..."}}, got {str(part)[:60]}',
            )
    return "".join(texts)


def sharegpt_messages(r: Row) -> list[dict[str, Any]]:
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
            raise r.bad(
                f"{where}.from",
                f"unknown role {sender!r} (expected one of {', '.join(SHAREGPT_ROLES)}; "
                f"map other names in the source's `roles`, e.g. roles: {{{sender}: assistant}})",
            )
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
        if (
            i
            and messages[-1]["role"] == "assistant"
            and SHAREGPT_ROLES.get(_sender(turns[i - 1])) == "assistant"
        ):
            messages[-1]["tool_calls"] = messages[-1].get("tool_calls", []) + calls
        else:
            messages.append({"role": "assistant", "tool_calls": calls})
    return check_messages(r, messages, "conversations")


def _sender(turn: dict[str, Any]) -> Any:
    return turn.get("from") if turn.get("from") is not None else turn.get("role")


def alpaca_messages(r: Row) -> list[dict[str, Any]]:
    return _instruction_messages(r, "input", "output", "system")


def dolly_messages(r: Row) -> list[dict[str, Any]]:
    return _instruction_messages(r, "context", "response")


def _instruction_messages(
    r: Row, extra_field: str, answer_field: str, system_field: str | None = None
) -> list[dict[str, Any]]:
    """user: `instruction` (+ "\\n\\n" + the extra field when non-empty), assistant: the answer field."""
    instruction = r.get("instruction", str)
    extra = r.get(extra_field, str, required=False) or ""
    output = r.get(answer_field, str)
    if not instruction.strip():
        raise r.bad("instruction", "empty")
    if not output.strip():
        raise r.bad(answer_field, "empty")
    system = r.get(system_field, str, required=False) if system_field else None
    user = instruction + "\n\n" + extra if extra.strip() else instruction
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    return head + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def prompt_completion_messages(r: Row) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        value = r.get(key, (str, list))
        if isinstance(value, str):
            if not value.strip():
                raise r.bad(key, f"empty {key}")
            messages.append({"role": role, "content": value})
        else:
            messages.extend(check_messages(r, value, key))
    return messages


def row_tools(r: Row) -> list[dict[str, Any]] | None:
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


# --- the records, the registry of readers, and a row to its record ---


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
    does not fit the row and its fix (`mapping_hint`)."""
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
    """A chat format's converter: its messages (the converters above), at least one of them the assistant's."""

    def convert(r: Row, vocab_size: int | None, markers: TextMarkers | None) -> Conversation:
        out = messages(r)
        if not any(m["role"] == "assistant" for m in out):
            raise r.bad(turns_field, "no assistant turn to learn from")
        return Conversation(
            messages=out, source=r.source, line=r.line, tools=row_tools(r) if tools else None, unit=r.unit
        )

    return convert


# One entry per format of config.fields.ROW_FORMATS (tests/data/test_records.py checks they match).
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
