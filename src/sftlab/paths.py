"""Where sftlab keeps files between runs: one cache root, shared by the data cache and the model cache.

`cache_root()` is `$SFTLAB_CACHE`, default `~/.cache/sftlab`. It sits at the bottom of the layers
(beside `config`) so that both `data/` and `model/` may use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab"))
