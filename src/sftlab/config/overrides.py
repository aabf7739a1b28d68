"""Dotted overrides of a config tree: `optim.lr=1e-5`, `data.train.0.path=x.jsonl` (the command line, the
Python API's keyword arguments, `sftlab convert-config`).

A value is read as a YAML scalar (1e-5, true, null, [1, 2]), except that of a marker key (VERBATIM_KEYS:
`data.response_template=### Answer:`), which is taken as written. A source may be written as its path
alone: `data.train: x.jsonl` (or a list of paths) is `data.train: [{path: x.jsonl}]`.
"""

from __future__ import annotations

from typing import Any

import yaml

from sftlab.config.fields import sources_shorthand
from sftlab.config.schema import ConfigError

# Keys whose override value is the text as written: YAML would read `### Answer:` as a comment and
# `Q:` as a mapping. A value in quotes is read as YAML (to keep spaces or escapes); empty or null unsets it.
VERBATIM_KEYS = ("response_template", "instruction_template")


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` of `tree` (list items by index, missing sections created) to `value`."""
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{key}': '{where}' is not a valid list index")
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{key}': '{where}' is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{key}': '{last}' is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (1e-5, true, null, [1, 2]), but
    those of VERBATIM_KEYS are taken as written."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. optim.lr=1e-5")
        try:
            value = _verbatim(raw) if key.strip().rsplit(".", 1)[-1] in VERBATIM_KEYS else _scalar(raw)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(
                f"override '{item}': the value is not valid YAML ({problem}); quote it to "
                f"take it as text, e.g. {key.strip()}='{raw}'"
            ) from None
        set_dotted(tree, key.strip(), value)
        normalise_sources(tree)
    return tree


def _verbatim(raw: str) -> str | None:
    if raw.strip() in ("", "null", "~"):
        return None
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        try:
            return str(yaml.safe_load(raw))
        except yaml.YAMLError:
            return raw
    return raw


def _scalar(raw: str) -> Any:
    value = yaml.safe_load(raw) if raw.strip() else None
    # YAML reads '1e-5' as a string (no dot in the mantissa); numbers are what people mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            pass
    return value


def normalise_sources(tree: dict[str, Any]) -> None:
    """Sources given as bare paths become `{path: ...}` mappings (so paths resolve and `.0.x` overrides apply)."""
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if key in data:
                data[key] = sources_shorthand(data[key])


def gives_training_data(overrides: list[str] | None) -> bool:
    """Whether the overrides set the whole training data (`data.train=...`), not a key inside it."""
    return any(item.partition("=")[0].strip() == "data.train" for item in overrides or [])
