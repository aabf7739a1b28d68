"""Shared data types and constants of the data pipeline (a leaf module: it imports nothing of sftlab).

- `IGNORE_INDEX`: the label of a position that carries no loss (PyTorch's cross-entropy default).
- `TokenizedExample`: token ids and labels ALIGNED with them (label i is the target of position i;
  `model/loss.py` does the next-token shift); `VisionExample` adds its image references. The CS336
  interface (`data/cs336.py`) is the one place that hands out labels already shifted, as that assignment
  specifies.
- `TokenGroup`: one example of several sequences (e.g. a chosen and a rejected answer, in that order) and
  its side values (e.g. a weight): what a store with a group layout gives (data/store.py); SFT's
  examples are groups of one, given as the bare `TokenizedExample`.
- The errors: `DataError` (the data cannot be used), `BadRecord` (one unusable row, with its place;
  `ImageRow`: one with an image part, gathered per source into one DataError), `TemplateError` (a
  chat template cannot render/mask a conversation exactly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain
from typing import Any

from sftlab.errors import SftlabError

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE_INDEX where no loss

    @property
    def num_targets(self) -> int:
        # the first position is never predicted, so it never counts
        return max(0, len(self.labels) - 1 - self.labels[1:].count(IGNORE_INDEX))


@dataclass
class VisionExample(TokenizedExample):
    """Token ids with image tokens expanded, aligned labels, and the example's image references in order
    (absolute paths, or images in memory)."""

    images: tuple[Any, ...] = ()


@dataclass
class TokenGroup:
    """One example made of k >= 1 sequences, in order, and its side values (name -> one number)."""

    members: tuple[TokenizedExample, ...]
    side: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> list[int]:
        """Every member's ids end to end: the example's tokens, as the loop counts them."""
        return list(chain.from_iterable(m.input_ids for m in self.members))

    @property
    def doc_lengths(self) -> list[int]:
        """The members' lengths: each member attends to itself only (the loop's attention FLOPs)."""
        return [len(m.input_ids) for m in self.members]

    @property
    def num_targets(self) -> int:
        return sum(m.num_targets for m in self.members)


class DataError(SftlabError, ValueError):
    """The data cannot be used; the message names the source and what is wrong."""


class TemplateError(SftlabError, ValueError):
    """The chat template cannot render this conversation in a way we can mask exactly."""


class BadRecord(SftlabError, ValueError):
    """One unusable row: where it is (`file:line`, or `source row N`; both 1-based), which field, and why."""

    def __init__(self, source: str, line: int, field_name: str | None, reason: str, unit: str = "line"):
        self.source, self.line, self.field_name, self.reason, self.unit = (
            source,
            line,
            field_name,
            reason,
            unit,
        )
        super().__init__(f"{self.where}" + (f" field '{field_name}'" if field_name else "") + f": {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across tokenization worker processes
        return BadRecord, (self.source, self.line, self.field_name, self.reason, self.unit)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source} row {self.line}"


class ImageRow(BadRecord):
    """A row with an image content part: not skipped like other bad rows, but gathered into one
    run-level DataError for the source (a text-only model cannot train on images)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return ImageRow, (self.source, self.line, self.field_name, self.reason, self.unit)
