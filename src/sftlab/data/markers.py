"""Response/instruction markers on plain text rows: which characters carry no loss (TRL's
completion-only `response_template` / `instruction_template`, on characters instead of token ids).

`TextMarkers(response, instruction)` is a source's setting (`data.response_template` /
`data.instruction_template`, or the source's own pair). `no_loss_spans(text, markers)` returns the
inclusive character spans `[start, end]` of a text row that get no loss; records.py adds them to the
row's `loss_masking_spans` (a union), so the tokens are marked exactly as explicit spans mark them:
a token overlapping a no-loss character gets no loss. Markers are found by plain string search on
the text, before tokenization, so a marker that tokenizes differently inside the text than alone
(TRL's documented pitfall) is found all the same.

- Without an instruction marker (TRL's semantics): everything up to and including the LAST response
  marker carries no loss; the text after it is the target.
- With an instruction marker (multi-turn): no loss from the start through the end of the first
  response marker, and from each instruction marker (inclusive) through the end of the next response
  marker; targets are the texts after a response marker up to the next instruction marker (or the
  end). A response marker inside a target is part of the target.

The markers themselves are never targets. A text without the response marker, or whose last
instruction marker has no response marker after it (a turn without an answer), raises `ValueError`
with the reason (records.py makes it a bad row naming the field `text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Span = tuple[int, int]  # inclusive character span


@dataclass(frozen=True)
class TextMarkers:
    response: str
    instruction: str | None = None

    def __post_init__(self) -> None:
        if not self.response:
            raise ValueError("response_template must be a non-empty string")
        if self.instruction is not None and (not self.instruction or self.instruction == self.response):
            raise ValueError(
                "instruction_template must be a non-empty string different from response_template"
            )

    def key(self) -> list[str | None]:
        """The markers' part of the data cache key."""
        return [self.response, self.instruction]


def markers_for(spec: Any, data_cfg: Any) -> TextMarkers | None:
    """A source's markers: its own `response_template` (with its own `instruction_template`) when it
    sets one, else the data section's; None when neither does."""
    own = getattr(spec, "response_template", None)
    if own:
        return TextMarkers(own, getattr(spec, "instruction_template", None))
    if getattr(data_cfg, "response_template", None):
        return TextMarkers(data_cfg.response_template, data_cfg.instruction_template)
    return None


def _next_marker(text: str, start: int, markers: TextMarkers) -> tuple[int, str] | None:
    """(position, marker) of the first marker at or after `start`; the longer one where both start there."""
    found = [
        (at, -len(m), m)
        for m in (markers.response, markers.instruction)
        if m is not None and (at := text.find(m, start)) >= 0
    ]
    if not found:
        return None
    at, _, marker = min(found)
    return at, marker


def no_loss_spans(text: str, markers: TextMarkers) -> list[Span]:
    """The inclusive character spans of `text` that carry no loss (see the module docstring)."""
    response, instruction = markers.response, markers.instruction
    missing = f"no {response!r} (the response template) in the text"
    if instruction is None:
        at = text.rfind(response)
        if at < 0:
            raise ValueError(missing)
        return [(0, at + len(response) - 1)]
    spans: list[Span] = []
    open_at: int | None = 0  # where the current no-loss stretch began; None inside a target
    pos = 0
    while (hit := _next_marker(text, pos, markers)) is not None:
        at, marker = hit
        if marker == response and open_at is not None:
            spans.append((open_at, at + len(response) - 1))
            open_at = None
        elif marker == instruction and open_at is None:
            open_at = at
        pos = at + len(marker)
    if not spans:
        raise ValueError(missing)
    if open_at is not None:
        raise ValueError(
            f"the instruction template {instruction!r} at character {open_at} has no response "
            f"template {response!r} after it (a turn without an answer)"
        )
    return spans
