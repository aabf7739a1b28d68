"""What the commands check before their heavy imports (torch and transformers take seconds): paths and
arguments, so a typo answers at once with the path named.

A model spec that is a local path (`sftlab.paths.is_local_path`: it exists, or starts with `./`, `../`,
`/` or `~`, ...) and is not there is refused here and never looked up on the Hugging Face Hub; model
resolution (model/loading.py) applies the same rule for the Python API. Data sources go through
`data/locate.py`. Everything here imports only light modules.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sftlab.config.schema import ConfigError, SFTConfig, SourceConfig
from sftlab.data.locate import check_local_paths
from sftlab.data.toolcalls import read_tools_file
from sftlab.data.types import DataError
from sftlab.model.sampling import check_sampling
from sftlab.paths import missing_local_path, not_found_message


def check_model(spec: str, what: str = "model path") -> None:
    """A ConfigError naming `spec` when it is a local path that is not there (never sent to the Hub)."""
    message = missing_local_path(spec, what)
    if message is not None:
        raise ConfigError(message)


def check_config_paths(cfg: SFTConfig) -> None:
    """train/prepare: the data sources, model.name_or_path, model.tokenizer and match_eval.path."""
    check_local_paths(cfg.data.train + cfg.data.eval)
    check_model(cfg.model.name_or_path, "model.name_or_path: model path")
    if cfg.model.tokenizer:
        check_model(cfg.model.tokenizer, "model.tokenizer: directory")
    if cfg.match_eval is not None and not Path(cfg.match_eval.path).expanduser().is_file():
        raise DataError(not_found_message("match_eval.path: file", cfg.match_eval.path))


def check_run_dir(path: str, what: str = "run directory") -> None:
    """export/report: the directory is there."""
    where = Path(path)
    if not where.is_dir():
        raise ConfigError(f"{path} is not a directory" if where.exists() else not_found_message(what, path))


def pairs(text: str | None, flag: str) -> dict[str, str] | None:
    """`a=b,c=d` -> {"a": "b", "c": "d"} (None when the flag was not given)."""
    if text is None:
        return None
    parsed = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in parsed):
        raise SystemExit(
            f"error: {flag} takes name=value pairs separated by commas, e.g. "
            f"{'prompt=question,completion=answer' if flag == '--columns' else 'human=user,gpt=assistant'}"
        )
    return {k.strip(): v.strip() for k, v in parsed}


def check_eval_args(ns: argparse.Namespace) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """eval: the model, the data file and --columns/--roles (returned parsed)."""
    check_model(ns.model_dir)
    check_local_paths([SourceConfig(path=ns.data)])
    return pairs(ns.columns, "--columns"), pairs(ns.roles, "--roles")


def check_reply_args(ns: argparse.Namespace) -> None:
    """generate/chat: the sampling settings, the --tools file, the --image files and the model (in the order
    `reply_function` checks them)."""
    check_sampling(ns.temperature, ns.top_p)
    if ns.tools:
        read_tools_file(ns.tools)
    for path in ns.image or []:
        if not Path(path).is_file():
            raise ConfigError(f"--image: no such file: {path}")
    check_model(ns.model_dir)
