"""Whether a data source path is local, and the error for a missing one (with a did-you-mean).

Hub dataset names are `name` or `owner/name`. A path is local, and never tried on the Hub, when
`sftlab.paths.is_local_path` says so (it exists, starts with `.`, `/` or `~`, holds a backslash or more
than one `/`), has a file extension (letters only: `.jsonl`, `.jsnol`; `teknium/OpenHermes-2.5` stays a
hub name) or its first component is a local directory. Light on purpose (no `datasets` import): the CLI
checks the paths before the heavy imports, so a mistyped file name fails at once.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path

from sftlab.config.schema import SourceConfig
from sftlab.data.types import DataError
from sftlab.paths import is_local_path

# A file extension: letters only (`.jsnol`, `.parquet`), so hub names such as `teknium/OpenHermes-2.5` are not.
_EXTENSION = re.compile(r"\.[A-Za-z]{1,10}$")


def looks_local(path_str: str) -> bool:
    """A path that is never tried as a hub dataset name (hub names are `name` or `owner/name`)."""
    head = path_str.split("/", 1)[0]
    return (
        is_local_path(path_str)
        or bool(_EXTENSION.search(path_str))
        or ("/" in path_str and Path(head).is_dir())
    )


def not_found(path: Path) -> DataError:
    """The error for a missing local source: its absolute path and the closest name next to it."""
    where = path if path.is_absolute() else f"{path} (from {Path.cwd()})"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return DataError(f"data source not found: {where}; its directory {parent} does not exist either")
    names = [p.name for p in itertools.islice(parent.iterdir(), 10_000) if not p.name.startswith(".")]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    hint = f"; did you mean {parent / close[0]}?" if close else ""
    return DataError(f"data source not found: {where}{hint}")


def check_local_paths(specs: list[SourceConfig]) -> None:
    """Before any work: each source that looks local exists (else the error `open_source` would give)."""
    for spec in specs:
        path = Path(spec.path).expanduser()
        if looks_local(spec.path) and not path.exists():
            raise not_found(path)
