"""Paths: where sftlab keeps files between runs, and whether a name is a local path.

`cache_root()` is `$SFTLAB_CACHE`, default `~/.cache/sftlab`: one cache root, shared by the data cache
and the model cache. `is_local_path(spec)` is the one rule for whether a model, tokenizer or data spec
names something on this machine, and so is never looked up on the Hugging Face Hub;
`missing_local_path` is the error text for such a spec that is not there. Both are light (no torch,
no transformers), so the CLI checks its arguments with them before the heavy imports. This module sits
at the bottom of the layers (beside `config`) so that `data/`, `model/` and the CLI may all use it.
"""

from __future__ import annotations

import os
from pathlib import Path

# What a hub id (`name` or `owner/name`) never starts with: `./`, `../`, `.hidden`, `/abs`, `~/home`.
LOCAL_PREFIXES = (".", "/", "~")


def cache_root() -> Path:
    return Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab"))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long or with a NUL byte: nothing on disk
        return False


def is_local_path(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a local path, never a Hugging Face Hub id: a `Path` (any os.PathLike), anything
    that exists on disk, and a name that starts with `.`, `/` or `~` (`./`, `../`), holds a backslash or
    more than one `/` (hub ids are `name` or `owner/name`)."""
    if isinstance(spec, os.PathLike):
        return True
    text = str(spec)
    return (
        text.startswith(LOCAL_PREFIXES)
        or "\\" in text
        or text.count("/") > 1
        or _exists(Path(text).expanduser())
    )


def not_found_message(what: str, spec: str | os.PathLike) -> str:
    """`{what} not found: {spec}`, with the directory a relative path was looked for from."""
    path = Path(spec).expanduser()
    return f"{what} not found: {spec}" + ("" if path.is_absolute() else f" (from {Path.cwd()})")


def missing_local_path(spec: str | os.PathLike, what: str = "model path") -> str | None:
    """The error text for a spec that is a local path (`is_local_path`) and is not there, else None: such a
    spec is never sent to the Hub, so it fails at once instead of after the Hub's retries."""
    if not is_local_path(spec) or _exists(Path(spec).expanduser()):
        return None
    return (
        not_found_message(what, spec) + "; a local path is never looked up on the Hugging Face Hub "
        "(hub ids are `name` or `owner/name`)"
    )
