"""What `sftlab convert-config` reads, turned into one mapping of option names: a YAML or JSON file, a
shell command or script that launches a Python training script with argparse flags (open-instruct's
`finetune.py`, with `NAME=value` shell variables substituted and the launcher's own flags kept apart), a
Hydra config (HALOs: `config.yaml`, its `defaults:` groups such as `model: llama` read from the group
directories, and `key=value` / `+key=value` / `++key=value` overrides), and nested trees flattened to
dotted names (Fast-LLM)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from sftlab.config.schema import ConfigError

ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(\S*)\s*$")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
COMMAND_ENDS = {"|", "||", "&&", ";", "2>&1", ">", ">>", "&"}
INTERPOLATION = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping."""
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is neither YAML nor JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of option names at the top level")
    return tree


def scalar(text: str) -> Any:
    """A command-line value as the tool's parser reads it: numbers, booleans, lists (`[a,b]`), strings."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads 5e-06 (no dot) as a string; argparse and Hydra as a float
        return float(value) if re.fullmatch(r"[-+]?\d*\.?\d+[eE][-+]?\d+", value) else value
    return text if value is None and text not in ("null", "None", "~") else value


def _substituted(text: str) -> str:
    """The script with line continuations joined and its simple `NAME=value` variables substituted."""
    text = text.replace("\\\n", " ")
    names = {m.group(1): m.group(2).strip("'\"") for m in map(ASSIGNMENT.match, text.splitlines()) if m}
    return VARIABLE.sub(lambda m: names.get(m.group(1) or m.group(2), m.group(0)), text)


def command_tokens(path: str | Path) -> tuple[list[str], list[str]]:
    """(launcher tokens, script tokens) of the first command in a shell file that runs a `.py` script."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    for line in _substituted(text).splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:
            continue
        script = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if script is None:
            continue
        rest = tokens[script + 1 :]
        end = next((i for i, t in enumerate(rest) if t in COMMAND_ENDS or t.startswith(">")), len(rest))
        return tokens[:script], rest[:end]
    raise ConfigError(f"{path}: neither a YAML/JSON mapping nor a shell command that runs a .py script")


def argparse_flags(tokens: list[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, `--key v1 v2` (a list), `--flag` (true) and `--no_flag` (false)."""
    flags: dict[str, Any] = {}
    key: str | None = None
    for token in tokens:
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            key = None if eq else name
            flags[name] = scalar(value) if eq else True
        elif key is not None:
            value = scalar(token)
            flags[key] = value if flags[key] is True else [*_as_list(flags[key]), value]
    for name in [n for n, v in flags.items() if v is True and n.startswith("no_")]:
        flags.pop(name)
        flags[name[3:]] = False
    return flags


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as dotted names (`optimizer.learning_rate.base`); lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def hydra_override(tree: dict[str, Any], override: str) -> None:
    """Apply one Hydra override (`key=value`, `+key=value`, `++key=value`, `~key`) to a nested mapping."""
    if override.startswith("~"):
        node, last = _parent(tree, override[1:].split("=")[0])
        node.pop(last, None)
        return
    key, eq, value = override.lstrip("+").partition("=")
    if not eq:
        raise ConfigError(f"override '{override}': expected key=value (Hydra's ++key=value also works)")
    node, last = _parent(tree, key.strip())
    node[last] = scalar(value)


def _parent(tree: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # missing, null or a value: the override makes it a section
            node[part] = {}
        node = node[part]
    return node, parts[-1]


def resolve_interpolations(tree: dict[str, Any]) -> dict[str, Any]:
    """`${name}` / `${a.b}` in string values replaced by the value they name (OmegaConf's simple case)."""
    flat = flatten(tree)

    def resolve(value: Any, depth: int = 0) -> Any:
        if not isinstance(value, str) or depth > 8:
            return value
        whole = INTERPOLATION.fullmatch(value)
        if whole and whole.group(1) in flat:
            return resolve(flat[whole.group(1)], depth + 1)
        return INTERPOLATION.sub(lambda m: str(resolve(flat.get(m.group(1), m.group(0)), depth + 1)), value)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return resolve(node)

    return walk(tree)
