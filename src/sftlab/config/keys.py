"""The config's dotted keys: every key (`config_keys`), the section class that holds a key, and the
did-you-mean for a mistyped key or value in a validation error's message (`suggest_key`,
`format_validation_error`).

A mistyped key is matched against another tool's name for one of ours (aliases.py: `learning_rate` ->
optim.lr), then against the keys of its own section, then against every key.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from sftlab.config.aliases import ALIASES
from sftlab.config.schema import SFTConfig


def model_of(annotation: Any) -> type[BaseModel] | None:
    """The config class inside an annotation (X, X | None, list[X]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = model_of(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the key at `loc` (list indices skipped)."""
    model: type[BaseModel] | None = SFTConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = model_of(field.annotation) if field is not None else None
    return model


def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every dotted key of the config (lists of sources as `data.train.N.path`)."""
    model = model or SFTConfig
    keys = []
    for name, field in model.model_fields.items():
        inner = model_of(field.annotation)
        is_list = getattr(field.annotation, "__origin__", None) is list
        sub = f"{prefix}{name}." + ("N." if is_list else "")
        keys += config_keys(inner, sub) if inner is not None else [f"{prefix}{name}"]
    return keys


def suggest_key(loc: tuple) -> str | None:
    """A did-you-mean for the unknown key at `loc`: another tool's name for one of our keys (aliases.py,
    e.g. learning_rate -> optim.lr), else a close name in the same section, else the same name anywhere."""
    name = str(loc[-1])
    holder = _model_at(loc[:-1])
    prefix = ".".join(str(p) for p in loc[:-1])
    here = list(holder.model_fields) if holder is not None else []
    target = ALIASES.get(name.lower())
    if target is not None:  # inside a source, `data.train.N.x` names that very source
        inside = len(loc) > 3 and loc[0] == "data" and isinstance(loc[2], int)
        return f"data.{loc[1]}.{loc[2]}.{target.split('.N.')[1]}" if inside and ".N." in target else target
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    if close:
        return f"{prefix}.{close[0]}" if prefix else close[0]
    anywhere = [k for k in config_keys() if k.rsplit(".", 1)[-1] == name]
    if not anywhere:
        anywhere = difflib.get_close_matches(name, config_keys(), n=1, cutoff=0.75)
    return anywhere[0] if anywhere else None


def _suggest_value(e: dict) -> str:
    expected = re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))
    close = difflib.get_close_matches(str(e.get("input")), expected, n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else ""


def format_validation_error(err: ValidationError, origin: str) -> str:
    """The message of a config that fails validation: one line per problem, with its dotted key, what was
    given and a did-you-mean; `origin` says where the config came from (its file, the defaults, ...)."""
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = suggest_key(e["loc"])
            lines.append(f"  {loc}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
            continue
        hint = _suggest_value(e) if e["type"] == "literal_error" else ""
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r}){hint}")
    return "\n".join(lines)
