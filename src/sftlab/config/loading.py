"""Loading a run's configuration: a YAML file maps 1:1 onto the pydantic models of schema.py.

`load_config(path, overrides)` reads the YAML, applies dotted CLI overrides (overrides.py:
`optim.lr=1e-5`, `data.train.0.path=x.jsonl`; a marker such as `data.response_template=### Answer:`
is taken as written), and validates. Unknown or mistyped keys
are rejected with their dotted path. With no path, the packaged demo config is used, unless the
overrides give the training data (`data.train=FILE`): then the library defaults are (the quick start).
A source may be written as its path alone: `data.train: x.jsonl` (or a list of paths) is
`data.train: [{path: x.jsonl}]`. `resolve_config` is the same for the Python API's arguments, and
`dump_config` writes a config back as YAML.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sftlab.config.keys import format_validation_error, suggest_key
from sftlab.config.overrides import apply_overrides, gives_training_data, normalise_sources, set_dotted
from sftlab.config.schema import ConfigError, SFTConfig

DEMO_CONFIG = Path(__file__).parents[1] / "demo" / "demo.yaml"
NO_TRAINING_DATA = "data.train: at least one training source is required"


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
            for source in data.get(key) or []:
                if isinstance(source, dict) and isinstance(source.get("path"), str):
                    p = Path(source["path"]).expanduser()
                    if not p.is_absolute() and (base / p).exists():
                        source["path"] = str(base / p)
    if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
        p = Path(data["chat_template"]).expanduser()
        if p.suffix == ".jinja" and not p.is_absolute() and (base / p).exists():
            data["chat_template"] = str(base / p)
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        p = Path(model["name_or_path"]).expanduser()
        if model["name_or_path"] != "default" and not p.is_absolute() and (base / p).exists():
            model["name_or_path"] = str(base / p)
    match_eval = tree.get("match_eval")
    if isinstance(match_eval, dict) and isinstance(match_eval.get("path"), str):
        p = Path(match_eval["path"]).expanduser()
        if not p.is_absolute() and (base / p).exists():
            match_eval["path"] = str(base / p)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, require_data: bool = True
) -> SFTConfig:
    """Read a YAML config, apply overrides, validate. With no `path`: the packaged demo config, or the
    library defaults when the overrides give the training data (`data.train=FILE`). `require_data`:
    data.train must name a source (a run's own config.yaml may not: the Python API passes datasets)."""
    if path is None and gives_training_data(overrides):
        tree: dict[str, Any] = {}
        origin = "the library defaults + overrides"
    else:
        cfg_path = Path(path) if path is not None else DEMO_CONFIG
        tree = _read_yaml(cfg_path)
        normalise_sources(tree)
        _resolve_paths(tree, cfg_path.resolve().parent)
        origin = str(cfg_path)
    apply_overrides(tree, overrides or [])
    try:
        cfg = SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, origin)) from None
    if require_data and not cfg.data.train:
        raise ConfigError(f"{origin}: {NO_TRAINING_DATA}")
    return cfg


def resolve_config(
    config: str | Path | dict | SFTConfig | None = None, values: dict[str, Any] | None = None
) -> SFTConfig:
    """The config of a Python API call: `config` (a YAML path, a dict tree, an SFTConfig, or None for the
    library defaults) with `values` set on it -- dotted keys (`{"optim.lr": 1e-5}`) or whole sections
    (`{"optim": {"lr": 1e-5}}`, merged), as Python values (not parsed as YAML). A mistyped key gets the
    same did-you-mean as in a YAML file (`learning_rate` -> optim.lr)."""
    if isinstance(config, (str, Path)):
        tree = load_config(config, require_data=False).model_dump(mode="python")
        origin = str(config)
    elif isinstance(config, SFTConfig):
        tree, origin = config.model_dump(mode="python"), "the SFTConfig given"
    elif isinstance(config, dict):
        tree, origin = copy.deepcopy(config), "the config dict given"
    elif config is None:
        tree, origin = {}, "the library defaults"
    else:
        raise ConfigError(
            f"config: expected a YAML path, a dict or an SFTConfig, got {type(config).__name__}"
        )
    for key, value in (values or {}).items():
        if "." not in key and isinstance(value, dict) and key in SFTConfig.model_fields:
            if not isinstance(tree.get(key), dict):
                tree[key] = {}
            _merge_tree(tree[key], value)
        elif "." not in key and key not in SFTConfig.model_fields:
            hint = suggest_key((key,))
            raise ConfigError(
                f"{key}: unknown key"
                + (f"; did you mean {hint}?" if hint else "")
                + " (keyword arguments are config keys: dotted, e.g. **{'optim.lr': 1e-5}, or sections)"
            )
        else:
            set_dotted(tree, key, value)
        normalise_sources(tree)
    try:
        return SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(
            format_validation_error(e, origin + (" + keyword arguments" if values else ""))
        ) from None


def _merge_tree(into: dict[str, Any], values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_tree(into[k], v)
        else:
            into[k] = v


def dump_config(cfg: SFTConfig) -> str:
    """The config as YAML, every key written (a run's config.yaml, `sftlab config show`)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
