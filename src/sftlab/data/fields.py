"""What a row's field names say: a source's renaming onto the format's names (`ColumnMap`), why a
row fits no format (`no_format_message`; which one it fits is data/formats.py's `detect_format`), why a mapping
does not fit a row and its fix (`mapping_hint`), the mapping entries a row uses (`ColumnMap.used`),
the fields no reader of its format uses (`unknown_fields`), and a row under the format's names that
names its fields as the source does in a BadRecord (`Row`). Which format a row is read as is the
registry's (config.ROW_FORMATS, data/formats.py: READERS).

A source's `ColumnMap` (its `columns` and `roles` settings) renames the row's own fields onto the
format's names (`question` -> `prompt`), the keys inside its message lists (`from` -> `role`) and
its role names (`human` -> `user`). Errors name the row's own keys (as the file has them), never
the renamed ones. The fields each format reads are `config.ROW_FIELDS`; the row schema is
documented in docs/data.md.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sftlab.config.fields import MESSAGE_KEYS, REQUIRED_FIELDS, ROLES, ROW_FIELDS, TURN_KEYS, expected_formats
from sftlab.data.types import BadRecord

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
