"""Data pipeline. `PackedSFTDataset` and `iterate_batches` (the CS336 interface) are imported on first use."""

from __future__ import annotations

from typing import Any

__all__ = ["PackedSFTDataset", "iterate_batches"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from sftlab.data import cs336

        return getattr(cs336, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
