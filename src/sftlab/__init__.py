"""sftlab: supervised fine-tuning of causal language models.

Python API (sftlab/api.py, docs/python.md): `sftlab.train`, `sftlab.prepare`, `sftlab.evaluate`,
`sftlab.generate`, `sftlab.default_model`, with `SFTConfig` (sftlab/config/) and `DatasetSource`; the command line is
`sftlab` (sftlab/cli.py), a thin layer over the same functions. Names are imported on first use, so
`import sftlab` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "train": "sftlab.api",
    "prepare": "sftlab.api",
    "evaluate": "sftlab.api",
    "generate": "sftlab.api",
    "default_model": "sftlab.api",
    "SFTConfig": "sftlab.config.schema",
    "load_config": "sftlab.config.loading",
    "ConfigError": "sftlab.config.schema",
    "DatasetSource": "sftlab.data.sources",
    "TrainResult": "sftlab.trainer.run",
    "SFTObjective": "sftlab.trainer.objective",
    "CallbackError": "sftlab.trainer.callbacks",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sftlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
