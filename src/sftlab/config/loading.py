"""Typed run configuration: one YAML file maps 1:1 onto the pydantic models of config_schema.py.

`load_config(path, overrides)` reads the YAML, applies dotted CLI overrides
(`optim.lr=1e-5`, `data.train.0.path=x.jsonl`; a marker such as `data.response_template=### Answer:`
is taken as written), and validates. Unknown or mistyped keys
are rejected with their dotted path. With no path, the packaged demo config is used, unless the
overrides give the training data (`data.train=FILE`): then the library defaults are (the quick start).
A source may be written as its path alone: `data.train: x.jsonl` (or a list of paths) is
`data.train: [{path: x.jsonl}]`.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from sftlab.config.aliases import ALIASES
from sftlab.config.schema import (  # noqa: F401 - the schema is part of this module's interface
    FORMATS,
    MESSAGE_KEYS,
    REQUIRED_FIELDS,
    ROLES,
    ROW_FIELDS,
    TURN_KEYS,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    MatchEvalConfig,
    ModelConfig,
    OptimConfig,
    PeftSettings,
    SFTConfig,
    SourceConfig,
    TrainConfig,
    check_columns,
    sources_shorthand,
)

DEMO_CONFIG = Path(__file__).parents[1] / "demo" / "demo.yaml"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{where}' is not a valid list index")
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{where}' is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': '{last}' is not a valid list index")
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
        value = _verbatim(raw) if key.strip().rsplit(".", 1)[-1] in VERBATIM_KEYS else _scalar(raw)
        _set_dotted(tree, key.strip(), value)
        _normalise_sources(tree)
    return tree


# Keys whose override value is the text as written: YAML would read `### Answer:` as a comment and
# `Q:` as a mapping. A value in quotes is read as YAML (to keep spaces or escapes); empty or null unsets it.
VERBATIM_KEYS = ("response_template", "instruction_template")


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


def _normalise_sources(tree: dict[str, Any]) -> None:
    """Sources given as bare paths become `{path: ...}` mappings (so paths resolve and `.0.x` overrides apply)."""
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if key in data:
                data[key] = sources_shorthand(data[key])


def gives_training_data(overrides: list[str] | None) -> bool:
    """Whether the overrides set the whole training data (`data.train=...`), not a key inside it."""
    return any(item.partition("=")[0].strip() == "data.train" for item in overrides or [])


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config class inside an annotation (X, X | None, list[X]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
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
        model = _model_of(field.annotation) if field is not None else None
    return model


def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every dotted key of the config (lists of sources as `data.train.N.path`)."""
    model = model or SFTConfig
    keys = []
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        is_list = getattr(field.annotation, "__origin__", None) is list
        sub = f"{prefix}{name}." + ("N." if is_list else "")
        keys += config_keys(inner, sub) if inner is not None else [f"{prefix}{name}"]
    return keys


def suggest_key(loc: tuple) -> str | None:
    """A did-you-mean for the unknown key at `loc`: another tool's name for one of our keys (config_aliases.py,
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


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = suggest_key(e["loc"])
            lines.append(f"  {loc}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
            continue
        hint = _suggest_value(e) if e["type"] == "literal_error" else ""
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r}){hint}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return tree


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    """Paths written in a config file (data sources, .jinja template, model dir, match_eval file) that
    exist relative to that file are taken relative to it; others stay relative to the working directory
    (output_dir and cache_dir always are)."""
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            for src in data.get(key) or []:
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    p = Path(src["path"]).expanduser()
                    if not p.is_absolute() and (base / p).exists():
                        src["path"] = str(base / p)
    if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
        p = Path(data["chat_template"]).expanduser()
        if p.suffix == ".jinja" and not p.is_absolute() and (base / p).exists():
            data["chat_template"] = str(base / p)
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        p = Path(model["name_or_path"]).expanduser()
        if model["name_or_path"] != "default" and not p.is_absolute() and (base / p).exists():
            model["name_or_path"] = str(base / p)
    me = tree.get("match_eval")
    if isinstance(me, dict) and isinstance(me.get("path"), str):
        p = Path(me["path"]).expanduser()
        if not p.is_absolute() and (base / p).exists():
            me["path"] = str(base / p)


NO_TRAINING_DATA = "data.train: at least one training source is required"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                require_data: bool = True) -> SFTConfig:
    """Read a YAML config, apply overrides, validate. With no `path`: the packaged demo config, or the
    library defaults when the overrides give the training data (`data.train=FILE`). `require_data`:
    data.train must name a source (a run's own config.yaml may not: the Python API passes datasets)."""
    if path is None and gives_training_data(overrides):
        tree: dict[str, Any] = {}
        source = "the library defaults + overrides"
    else:
        cfg_path = Path(path) if path is not None else DEMO_CONFIG
        tree = _read_yaml(cfg_path)
        _normalise_sources(tree)
        _resolve_paths(tree, cfg_path.resolve().parent)
        source = str(cfg_path)
    apply_overrides(tree, overrides or [])
    try:
        cfg = SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    if require_data and not cfg.data.train:
        raise ConfigError(f"{source}: {NO_TRAINING_DATA}")
    return cfg


def resolve_config(config: str | Path | dict | SFTConfig | None = None,
                   values: dict[str, Any] | None = None) -> SFTConfig:
    """The config of a Python API call: `config` (a YAML path, a dict tree, an SFTConfig, or None for the
    library defaults) with `values` set on it -- dotted keys (`{"optim.lr": 1e-5}`) or whole sections
    (`{"optim": {"lr": 1e-5}}`, merged), as Python values (not parsed as YAML). A mistyped key gets the
    same did-you-mean as in a YAML file (`learning_rate` -> optim.lr)."""
    if isinstance(config, (str, Path)):
        tree = load_config(config, require_data=False).model_dump(mode="python")
        source = str(config)
    elif isinstance(config, SFTConfig):
        tree, source = config.model_dump(mode="python"), "the SFTConfig given"
    elif isinstance(config, dict):
        tree, source = copy.deepcopy(config), "the config dict given"
    elif config is None:
        tree, source = {}, "the library defaults"
    else:
        raise ConfigError(f"config: expected a YAML path, a dict or an SFTConfig, got {type(config).__name__}")
    for key, value in (values or {}).items():
        if "." not in key and isinstance(value, dict) and key in SFTConfig.model_fields:
            if not isinstance(tree.get(key), dict):
                tree[key] = {}
            _merge_tree(tree[key], value)
        elif "." not in key and key not in SFTConfig.model_fields:
            hint = suggest_key((key,))
            raise ConfigError(f"{key}: unknown key" + (f"; did you mean {hint}?" if hint else "")
                              + " (keyword arguments are config keys: dotted, e.g. **{'optim.lr': 1e-5}, or sections)")
        else:
            _set_dotted(tree, key, value)
        _normalise_sources(tree)
    try:
        return SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source + (" + keyword arguments" if values else ""))) from None


def _merge_tree(into: dict[str, Any], values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_tree(into[k], v)
        else:
            into[k] = v


def _type_name(annotation: Any) -> str:
    args = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if args:  # a union
        return " \\| ".join("`null`" if a is type(None) else _type_name(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return f"`{getattr(annotation, '__name__', annotation)}`"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def config_reference() -> str:
    """Every config key with its type, default and description, as Markdown (docs/config.md)."""
    out = ["# Configuration reference", "",
           "Generated by `sftlab config reference` from the typed config (src/sftlab/config.py); a test",
           "fails when this file is stale. One YAML file maps onto these sections; any key can be overridden",
           "on the command line as `section.key=value` (e.g. `optim.lr=1e-5`, `data.train.0.path=x.jsonl`).", ""]
    sections = [(name, _model_of(f.annotation), f) for name, f in SFTConfig.model_fields.items()]
    for name, model, field in sections:
        optional = " Optional: absent or `null` turns it off." if not field.is_required() and field.default is None else ""
        out += [f"## `{name}`", "", f"{model.__doc__ or field.description}{optional}", ""]
        out += _reference_table(model, name)
        if model is DataConfig:
            out += ["### `data.train.N` / `data.eval.N` (each source)", "", SourceConfig.__doc__ or "", ""]
            out += _reference_table(SourceConfig, "data.train.N")
    return "\n".join(out)


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def _reference_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _model_of(field.annotation) is SourceConfig:
            rows.append(f"| `{prefix}.{name}` | list of sources | `[]` | {_cell(field.description)} (see below) |")
            continue
        rows.append(f"| `{prefix}.{name}` | {_type_name(field.annotation)} | {_default(field)} | {_cell(field.description)} |")
    return rows + [""]


def dump_config(cfg: SFTConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
