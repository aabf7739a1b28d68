"""What preparing the data did, counted: the `DataReport` and its per-source `SourceStats`.

Every decision is counted, per source: rows read, bad rows, examples, the length policy's drops
and truncations, the format each row was read as, the fields no reader used (with a "did you
mean" hint), the entries of its `columns` / `roles` that no row used, a response template set for a
source without text rows, the target-token share (`count_targets`) and the lengths (`length_stats`).
`DataReport.summary()` is what a run prints before training.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from sftlab.config.fields import ROW_FIELDS
from sftlab.data.store import Examples, SourceData, TokenArrays
from sftlab.data.types import IGNORE_INDEX


@dataclass
class SourceStats:
    """What happened to one source, from rows read to examples used."""

    name: str
    split: str  # "train" | "eval"
    weight: float | int | None = None
    rows: int = 0
    bad: int = 0
    examples: int = 0  # tokenized successfully
    dropped: int = 0  # over max_seq_length
    truncated: int = 0
    no_target: int = 0  # dropped: no target token left after truncation
    used: int = 0  # examples in its split after mixing (repeats counted)
    held_out: int = 0  # moved to eval by eval_fraction
    cached: bool = False
    fast_render: bool = False  # rendered by the direct ChatML renderer (checked against the template)
    formats: dict[str, int] = field(default_factory=dict)  # format -> rows read as it
    unknown_fields: dict[str, int] = field(default_factory=dict)  # field no reader used -> rows holding it
    unused_mapping: list[str] = field(
        default_factory=list
    )  # `columns` / `roles` entries no row used, and why
    tokens: int = 0  # of its usable examples (after the length policy, before mixing)
    targets: int = 0  # of those tokens, the ones with a label (not -100)
    lengths: dict[str, int] = field(
        default_factory=dict
    )  # min, median, p95, max tokens of its usable examples
    markers_unused: str | None = None  # the response template set for a source without text rows
    images: int = 0  # images of its usable examples (vision-language sources)
    image_tokens: int = 0  # tokens the processor expanded them into (never targets)

    def line(self) -> str:
        parts = [f"{self.rows} rows", f"{self.bad} bad", f"{self.examples} examples"]
        parts += [
            f"{n} {what}"
            for n, what in (
                (self.dropped, "over length dropped"),
                (self.truncated, "truncated"),
                (self.no_target, "no target after truncation"),
            )
            if n
        ]
        used = f"{self.used} {self.split}" + (f" (weight {self.weight})" if self.weight is not None else "")
        held = f", {self.held_out} eval" if self.held_out else ""
        how = " (cached)" if self.cached else ""
        how += " (direct ChatML rendering, checked against the template)" if self.fast_render else ""
        return f"{self.name}: {', '.join(parts)} -> {used}{held}{how}"

    def details(self) -> list[str]:
        """Format(s) read, target share and lengths; warning lines for fields that no reader used, for
        `columns` / `roles` entries that no row used and for a response template no row uses."""
        formats = ", ".join(
            f"{fmt} ({n} rows)" for fmt, n in sorted(self.formats.items(), key=lambda x: -x[1])
        )
        parts = [f"format: {formats or '-'}"]
        if self.tokens:
            parts.append(f"targets: {self.targets / self.tokens:.1%} of {self.tokens:,} tokens")
        if self.lengths:
            parts.append("lengths: " + ", ".join(f"{k} {v}" for k, v in self.lengths.items()) + " tokens")
        if self.images:
            per = self.images / self.examples if self.examples else 0
            parts.append(
                f"images: {self.images:,} ({per:.2f} per example), {self.image_tokens:,} image tokens"
            )
        lines = ["; ".join(parts)]
        if self.unknown_fields:
            fields = ", ".join(
                f"{k} ({n} rows{_field_hint(k, self.formats)})"
                for k, n in sorted(self.unknown_fields.items(), key=lambda x: -x[1])
            )
            lines.append(
                f"warning: fields no reader of the format uses, ignored: {fields} "
                "(map them with the source's `columns` if they hold data; docs/data.md)"
            )
        if self.unused_mapping:
            lines.append(
                f"warning: mapping entries no row of {self.name} uses: {'; '.join(self.unused_mapping)} "
                "(check the names against the file's own; docs/data.md)"
            )
        if self.markers_unused:
            lines.append(
                f"warning: response_template {self.markers_unused!r} is set, but no row of this source is a "
                "text row: the markers apply to text rows only (chat rows use data.loss_on; docs/data.md)"
            )
        return lines


def _field_hint(name: str, formats: dict[str, int]) -> str:
    """'; did you mean X?' when an unknown field looks like a field of a format the source was read as."""
    fields = [f for fmt in formats for f in ROW_FIELDS.get(fmt, ())]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    close = close or [f for f in fields if len(name) > 3 and name in f]  # spans -> loss_masking_spans
    return f"; did you mean {close[0]}?" if close else ""


@dataclass
class DataReport:
    """The run's data, counted: per source in `sources`, and what only the whole run counts. The totals of
    the per-source counts (rows, bad, the length policy's) are sums over `sources`, never counted again."""

    kept: int = 0  # usable examples (after bad rows and length policy), before mixing
    bad_reasons: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    truncated_inside_turn: int = (
        0  # of the truncated: the cut fell inside a labelled turn (its end-of-turn token lost)
    )
    tools_dropped: int = (
        0  # rows trained without the tools / tool calls the template does not render (data.tools: drop)
    )
    sources: list[SourceStats] = field(default_factory=list)
    train_examples: int = 0
    eval_examples: int = 0
    # per source, in `sources` order: what it read and its usable examples (for `sftlab prepare --show`)
    source_data: list[SourceData] = field(default_factory=list, repr=False, compare=False)
    source_examples: list[Examples] = field(default_factory=list, repr=False, compare=False)
    eval_sets: dict[str, np.ndarray] = field(
        default_factory=dict, repr=False, compare=False
    )  # name -> eval positions

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.sources)

    @property
    def bad(self) -> int:
        return sum(s.bad for s in self.sources)

    @property
    def overlength_dropped(self) -> int:
        return sum(s.dropped for s in self.sources)

    @property
    def overlength_truncated(self) -> int:
        return sum(s.truncated for s in self.sources)

    @property
    def no_target_after_truncation(self) -> int:
        return sum(s.no_target for s in self.sources)

    @property
    def unknown_fields(self) -> dict[str, dict[str, int]]:
        """Source name -> its unknown fields and the rows holding each (sources with any)."""
        return {s.name: s.unknown_fields for s in self.sources if s.unknown_fields}

    @property
    def unused_mapping(self) -> dict[str, list[str]]:
        """Source name -> its `columns` / `roles` entries that no row used (sources with any)."""
        return {s.name: s.unused_mapping for s in self.sources if s.unused_mapping}

    def sources_json(self) -> list[dict]:
        return [asdict(s) for s in self.sources]

    def summary(self) -> str:
        """Totals on the first line, then one line per source."""
        parts = [
            f"{self.kept} examples kept of {self.rows} rows (train {self.train_examples}, "
            f"eval {self.eval_examples} after mixing)"
        ]
        if self.bad:
            parts.append(f"{self.bad} bad rows skipped ({dict(self.bad_reasons.most_common(5))})")
        if self.overlength_dropped:
            parts.append(f"{self.overlength_dropped} over max_seq_length dropped")
        if self.overlength_truncated:
            parts.append(
                f"{self.overlength_truncated} truncated to max_seq_length"
                + (
                    f" ({self.truncated_inside_turn} cut inside a trained turn: that turn keeps its start "
                    "but loses its end-of-turn token)"
                    if self.truncated_inside_turn
                    else ""
                )
            )
        if self.no_target_after_truncation:
            parts.append(f"{self.no_target_after_truncation} dropped: no target token left after truncation")
        if self.tools_dropped:
            parts.append(
                f"{self.tools_dropped} rows without the tools the chat template does not render (data.tools: drop)"
            )
        lines = ["; ".join(parts)]
        for s in self.sources:
            lines.append("  " + s.line())
            lines += ["    " + d for d in s.details()]
        return "\n".join(lines)


def length_stats(lengths: np.ndarray) -> dict[str, int]:
    """min, median, p95 and max of example lengths in tokens ({} for none)."""
    if not len(lengths):
        return {}
    q = np.percentile(lengths, [50, 95], method="nearest")
    return {"min": int(lengths.min()), "median": int(q[0]), "p95": int(q[1]), "max": int(lengths.max())}


SUM_BLOCK = 1 << 22  # tokens summed at a time: an int64 copy of this many (32 MiB), never of the whole array


def targets_per_example(store: TokenArrays) -> np.ndarray:
    """The target flags summed per example (int64), a block of whole examples of about SUM_BLOCK tokens at a
    time: `np.add.reduceat(targets, starts, dtype=np.int64)` over the whole array would first copy every
    token's flag to int64 (8 bytes a token: 2 GB for 250M tokens)."""
    offsets = store.offsets
    n = len(offsets) - 1
    per = np.zeros(n, dtype=np.int64)
    i = 0
    while i < n:
        a = int(offsets[i])
        j = min(n, max(i + 1, int(np.searchsorted(offsets, a + SUM_BLOCK, side="right")) - 1))
        starts = np.asarray(offsets[i:j], dtype=np.int64) - a
        per[i:j] = np.add.reduceat(store.targets[a : int(offsets[j])], starts, dtype=np.int64)
        i = j
    return per


def count_targets(data: SourceData, examples: Examples) -> int:
    """Tokens with a label (not -100) in `examples` (all from `data.arrays`, truncation included)."""
    store = data.arrays
    if store is None or not len(examples):
        return 0
    per = targets_per_example(store)
    per += np.diff(np.searchsorted(store.fix_pos, store.offsets))  # labels other than the id are targets too
    idx = np.searchsorted(store.offsets, examples.start, side="right") - 1
    whole = examples.length == store.lengths[idx]
    cut = np.flatnonzero(~whole)
    return int(per[idx[whole]].sum()) + sum(
        int(
            np.count_nonzero(
                store.tokens(int(examples.start[k]), int(examples.start[k] + examples.length[k]))[1]
                != IGNORE_INDEX
            )
        )
        for k in cut
    )
