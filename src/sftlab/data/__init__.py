"""Data pipeline: raw rows -> tokenized, masked examples -> packed/padded micro-batches.

Entry points (imported on first use):
- `build_datasets(data_cfg, tokenizer, seed)` -> (train, eval, DataReport): read every source,
  normalise the rows, render/tokenize/mask, cache, apply the length policy, mix, split off eval.
- `load_template(data_cfg, tokenizer)`: the chat template text for a run.
- `pack_examples(examples, "bfd" | "wrapped", max_seq_length)`, `packed_collate`, `pad_collate`,
  `MicroBatchStream`: from examples to model-ready tensors in a seeded, resumable order.
- `TokenizedExample`, `IGNORE_INDEX`, `DataError`: the shared types (`sftlab.data.types`).
- The CS336 interface: `PackedSFTDataset`, `iterate_batches` (labels there are already shifted).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "build_datasets": "dataset",
    "DataReport": "dataset",
    "DatasetSource": "dataset",
    "load_template": "templates",
    "pack_examples": "packing",
    "packed_collate": "packing",
    "pad_collate": "collate",
    "MicroBatchStream": "collate",
    "TokenizedExample": "types",
    "IGNORE_INDEX": "types",
    "DataError": "types",
    "PackedSFTDataset": "cs336",
    "iterate_batches": "cs336",
}
__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"sftlab.data.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
