"""datasets' private API as sftlab uses it (datasets 5.2.0)."""

from __future__ import annotations

from typing import Any


def fingerprint(dataset: Any) -> str | None:
    """The content fingerprint datasets keeps for a `Dataset` (a new one after every transform; what its own
    cache is keyed by), or None for an object without one.

    Touches: `Dataset._fingerprint`. Written against datasets 5.2.0.
    Public alternative: none that returns the same value (`datasets.fingerprint.generate_fingerprint(dataset)`
    hashes the dataset's state afresh: another value after transforms, and a cost per call)."""
    return getattr(dataset, "_fingerprint", None)
