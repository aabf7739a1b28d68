"""What a row's field names say: a source's renaming onto the format's names (`ColumnMap`), the
format its keys fit (`detect_format`), why a row fits none (`no_format_message`), and the fields
no reader of its format uses (`unknown_fields`).

A source's `ColumnMap` (its `columns` and `roles` settings) renames the row's own fields onto the
format's names (`question` -> `prompt`), the keys inside its message lists (`from` -> `role`) and
its role names (`human` -> `user`). The fields each format reads are `config.ROW_FIELDS`; the row
schema is documented in docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftlab.config import MESSAGE_KEYS, REQUIRED_FIELDS, ROW_FIELDS, TURN_KEYS


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


def _has(row: dict[str, Any], key: str) -> bool:
    return row.get(key) is not None  # columnar sources fill absent fields with None


def detect_format(row: dict[str, Any]) -> str:
    """The format of one row from its keys; KeyError (naming the closest format) when none fits."""
    if _has(row, "messages"):
        return "messages"
    if _has(row, "conversations"):
        return "sharegpt"
    if _has(row, "prompt") and _has(row, "completion"):
        return "prompt_completion"
    if _has(row, "instruction") and _has(row, "output"):
        return "alpaca"
    if _has(row, "input_ids"):
        return "pretokenized"
    if _has(row, "text"):
        return "text"
    raise KeyError(no_format_message(row))


def no_format_message(row: dict[str, Any], cmap: ColumnMap = NO_COLUMNS) -> str:
    """Why a row fits no format: its keys, the closest format (most of its fields present) and what
    that one lacks, and how to map the source's own field names."""
    present = {k for k in row if row[k] is not None}
    keys = sorted(present)[:8]
    expected = ("expected 'messages', 'conversations', 'prompt'+'completion', 'instruction'+'output', 'text' "
                "or 'input_ids'")
    score = {fmt: len(present & set(fields)) for fmt, fields in ROW_FIELDS.items()}
    best = max(score, key=lambda f: score[f])  # ties: the first in ROW_FIELDS order
    if not score[best]:
        return (f"cannot detect the row format from its keys {keys}; {expected}; to train on other field names, "
                "map them in the source's `columns`, e.g. columns: {prompt: question, completion: answer} (docs/data.md)")
    missing = [f for f in ROW_FIELDS[best][: REQUIRED_FIELDS[best]] if f not in present]
    lacks = ", ".join(f"'{cmap.theirs(f)}'" for f in missing)
    example = ", ".join(f"{f}: <your field>" for f in missing)
    return (f"cannot detect the row format from its keys {keys}; closest format: {best}, which also needs {lacks} "
            f"(or map your own field names in the source's `columns`, e.g. columns: {{{example}}}; docs/data.md)")


def unknown_fields(row: dict[str, Any], fmt: str, cmap: ColumnMap = NO_COLUMNS) -> tuple[str, ...]:
    """The row's fields (as the source names them) that format `fmt` does not read; ShareGPT turn keys
    other than from/value (or role/content) as `conversations[].<key>`."""
    known = {cmap.theirs(f) for f in ROW_FIELDS[fmt]}
    out = [k for k, v in row.items() if v is not None and k not in known]
    turns = row.get(cmap.theirs("conversations")) if fmt == "sharegpt" else None
    if isinstance(turns, list):
        seen = {cmap.theirs(k) for k in TURN_KEYS} | {"role", "content"}
        extra = {k for t in turns if isinstance(t, dict) for k, v in t.items() if v is not None and k not in seen}
        out += [f"{cmap.theirs('conversations')}[].{k}" for k in sorted(extra)]
    return tuple(out)
