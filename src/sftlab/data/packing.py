"""Packing: put several tokenized examples into one row so that no document attends to another.

Its one job is to turn examples into `PackedRow`s and padding-free batches whose `position_ids`
restart at 0 at every document. Packing is planned on the examples' lengths alone (`PackedRows`
holds index arrays); a row's tokens are laid out when it is indexed, i.e. when its micro-batch is
built. Strategies (`data.packing`):

- `none`: no packing; the trainer pads examples into micro-batches (pack_examples is not called).
- `bfd`: best-fit-decreasing bins of whole documents; a row never exceeds `max_seq_length` tokens
  (the packing capacity) and a document is never split (documents longer than that must be handled
  upstream by the length policy; here they are an error).
- `wrapped`: the examples are concatenated in order and cut into rows of exactly `max_seq_length`
  tokens (the last row may be shorter). A document may be split: its continuation in the next row
  is treated as a *new document* there (positions restart at 0, it cannot attend to its own head
  in the previous row, and its first token is not a target). Each split therefore costs one
  target token and some context.

Document isolation. `packed_collate` returns `input_ids`, `labels`, `position_ids` and no
`attention_mask`. Given no 2D attention mask and no KV cache (`use_cache=False`), transformers
(5.x `masking_utils._preprocess_mask_arguments` -> `find_packed_sequence_indices`) starts a new
sequence wherever consecutive position_ids do not increase by exactly 1, and builds a
block-diagonal causal mask for the `sdpa` and `eager` paths (flash-attention derives varlen
`cu_seqlens` from the same position_ids). With a KV cache (e.g. `use_cache=None` on a config whose
`use_cache` is True) that detection is skipped and documents DO attend to each other, so packed
batches are always run with `use_cache=False` (tested).

Labels: the loss shifts labels left by one (logits at t predict labels[t + 1]), so the label at a
document's first position would be predicted from the previous document's last token. It is set
to IGNORE_INDEX in every packed row, at every document start (including the row's first position,
which matters once rows are concatenated into one padding-free sequence).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from sftlab.data.types import IGNORE_INDEX, TokenizedExample

BFD_BLOCK = 1 << 16  # documents placed per block (their lengths and bins as Python lists)


@dataclass
class PackedRow:
    """Several documents laid end to end; `labels` already carry IGNORE_INDEX at each document start."""

    input_ids: list[int]
    labels: list[int]
    doc_lengths: list[int]  # per document, in order; sums to len(input_ids)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def position_ids(self) -> list[int]:
        """0, 1, ... restarting at every document."""
        return [p for n in self.doc_lengths for p in range(n)]

    @classmethod
    def from_docs(cls, docs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> PackedRow:
        """Lay out (input_ids, labels) pairs; the first label of each is replaced by IGNORE_INDEX."""
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for doc_ids, doc_labels in docs:
            if not doc_ids or len(doc_ids) != len(doc_labels):
                raise ValueError(
                    "a packed document needs as many labels as input_ids, and at least one token"
                )
            ids.extend(doc_ids)
            labels.append(IGNORE_INDEX)
            labels.extend(doc_labels[1:])
            lengths.append(len(doc_ids))
        return cls(ids, labels, lengths)


def bfd_bins(lengths: np.ndarray | Sequence[int], max_seq_length: int) -> np.ndarray:
    """Best-fit-decreasing: the bin (int64, numbered in opening order) of each document; each bin's total
    length is <= max_seq_length (the packing capacity).

    Documents are placed longest first (equal lengths in index order), each into the open bin with
    the least room that still fits it (among equals, the earliest-opened bin), else into a new bin.
    The open bins are indexed by remaining room: a sorted list of the distinct room values (at most
    `max_seq_length` of them) searched with bisect, and per room value a heap of bin numbers, so a
    placement costs O(log n) plus a short list shift. Memory: a few numpy arrays of the documents'
    count, and Python objects only per open bin (the documents are walked in blocks).
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    wrong = np.flatnonzero((lengths > max_seq_length) | (lengths < 1))
    if len(wrong):
        i, n = int(wrong[0]), int(lengths[wrong[0]])
        if n > max_seq_length:
            raise ValueError(
                f"document {i} has {n} tokens, more than the packing capacity {max_seq_length}; "
                "the length policy (data.on_overlength) should have dropped or truncated it"
            )
        raise ValueError(f"document {i} is empty")
    order = np.argsort(-lengths, kind="stable")  # ties keep index order
    bin_of = np.zeros(len(lengths), dtype=np.int64)
    opened = 0
    rooms: list[int] = []  # sorted distinct remaining room (> 0) of open bins
    bins_by_room: dict[int, list[int]] = {}  # room -> heap of bin numbers with exactly that room
    for block in range(0, len(order), BFD_BLOCK):
        idx = order[block : block + BFD_BLOCK]
        placed = []
        for n in lengths[idx].tolist():
            k = bisect.bisect_left(rooms, n)
            if k == len(rooms):  # no open bin fits: open one
                b, room = opened, max_seq_length
                opened += 1
            else:
                room = rooms[k]
                heap = bins_by_room[room]
                b = heapq.heappop(heap)
                if not heap:
                    del bins_by_room[room]
                    rooms.pop(k)
            placed.append(b)
            left = room - n
            if left > 0:
                if left not in bins_by_room:
                    bins_by_room[left] = []
                    bisect.insort(rooms, left)
                heapq.heappush(bins_by_room[left], b)
        bin_of[idx] = placed
    return bin_of


def bfd_rows(lengths: np.ndarray | Sequence[int], max_seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, row offsets) of the `bfd_bins` rows: bins in opening order, each listing its
    documents in ascending index order; row r is documents order[offsets[r]:offsets[r + 1]]."""
    bin_of = bfd_bins(lengths, max_seq_length)
    order = np.argsort(bin_of, kind="stable")
    counts = np.bincount(bin_of) if len(bin_of) else np.zeros(0, dtype=np.int64)
    return order, np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def pack_bfd(lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """The `bfd_bins` bins as lists of document indices: in opening order, each in ascending order."""
    order, offsets = bfd_rows(lengths, max_seq_length)
    flat = order.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


class PackedRows(Sequence[PackedRow]):
    """Packed rows as pieces of examples, built into `PackedRow`s only when indexed (micro-batch time).

    Row r is the pieces `row_offsets[r]:row_offsets[r + 1]`; piece p is tokens
    [piece_start[p], piece_stop[p]) of example `piece_example[p]`. With `Examples` over memory-mapped
    arrays, a million documents cost a few index arrays here.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        piece_example: np.ndarray,
        piece_start: np.ndarray,
        piece_stop: np.ndarray,
        row_offsets: np.ndarray,
    ):
        self.examples = examples
        self.piece_example = np.asarray(piece_example, dtype=np.int64)
        self.piece_start = np.asarray(piece_start, dtype=np.int64)
        self.piece_stop = np.asarray(piece_stop, dtype=np.int64)
        self.row_offsets = np.asarray(row_offsets, dtype=np.int64)
        sizes = np.concatenate([[0], np.cumsum(self.piece_stop - self.piece_start)])
        self.lengths = sizes[self.row_offsets[1:]] - sizes[self.row_offsets[:-1]]

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def _doc(self, p: int) -> tuple[list[int], list[int]]:
        i, a, b = int(self.piece_example[p]), int(self.piece_start[p]), int(self.piece_stop[p])
        if hasattr(self.examples, "arrays"):
            ids, labels = self.examples.arrays(i)
            return ids[a:b].tolist(), labels[a:b].tolist()
        ex = self.examples[i]
        return ex.input_ids[a:b], ex.labels[a:b]

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[k] for k in range(*r.indices(len(self)))]
        if not -len(self) <= r < len(self):
            raise IndexError(f"row {r} out of range for {len(self)} rows")
        r %= len(self)
        return PackedRow.from_docs(self._doc(p) for p in range(self.row_offsets[r], self.row_offsets[r + 1]))

    def fingerprint(self) -> str:
        """Identifies exactly these rows: the examples' fingerprint and the piece arrays."""
        h = hashlib.sha256(
            self.examples.fingerprint().encode() if hasattr(self.examples, "fingerprint") else b""
        )
        for arr in (self.piece_example, self.piece_start, self.piece_stop, self.row_offsets):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:32]


def _lengths(examples: Sequence[TokenizedExample]) -> np.ndarray:
    lengths = getattr(examples, "lengths", None)
    return np.asarray(
        lengths if lengths is not None else [len(ex.input_ids) for ex in examples], dtype=np.int64
    )


def pack_wrapped(examples: Sequence[TokenizedExample], max_seq_length: int) -> PackedRows:
    """Concatenate the examples in order and cut every `max_seq_length` tokens (the last row may be shorter).

    A document cut at a row end continues in the next row as a new document: position_ids restart
    there, it does not attend to its earlier part, and its first token there is not a target.
    """
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be positive, got {max_seq_length}")
    pieces: list[tuple[int, int, int]] = []
    row_offsets = [0]
    used = 0
    for i, n in enumerate(_lengths(examples).tolist()):
        start = 0
        while start < n:
            take = min(max_seq_length - used, n - start)
            pieces.append((i, start, start + take))
            start += take
            used += take
            if used == max_seq_length:
                row_offsets.append(len(pieces))
                used = 0
    if used:
        row_offsets.append(len(pieces))
    cols = np.asarray(pieces, dtype=np.int64).reshape(-1, 3)
    return PackedRows(examples, cols[:, 0], cols[:, 1], cols[:, 2], np.asarray(row_offsets))


def pack_examples(examples: Sequence[TokenizedExample], packing: str, max_seq_length: int) -> PackedRows:
    """Rows for `data.packing` `bfd` or `wrapped` (`none` packs nothing: the trainer pads examples);
    planned on the examples' lengths alone, assembled when indexed."""
    if getattr(examples, "grouped", False):
        raise ValueError(
            "examples of several sequences (groups) are not packed: each is one micro-batch unit "
            "(data.packing: none)"
        )
    if packing == "bfd":
        lengths = _lengths(examples)
        order, row_offsets = bfd_rows(lengths, max_seq_length)
        return PackedRows(examples, order, np.zeros_like(order), lengths[order], row_offsets)
    if packing == "wrapped":
        return pack_wrapped(examples, max_seq_length)
    raise ValueError(f"unknown packing {packing!r}; expected wrapped or bfd")


def packed_collate(
    rows: Sequence[PackedRow],
    pad_id: int | None = None,
    max_seq_length: int | None = None,
    min_rows: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs for packed rows: `input_ids`, `labels`, `position_ids`; deliberately no `attention_mask`.

    With `pad_id=None` (default) the rows are concatenated into a single padding-free sequence of
    shape (1, total tokens). With a `pad_id`, each row becomes one batch row of shape
    (len(rows), longest row, or `max_seq_length`: a fixed shape); a shorter row is filled with one
    padding block whose positions also restart at 0 (so it is a separate sequence nobody attends to)
    and whose labels are IGNORE_INDEX.
    `min_rows` adds rows that are all padding (fixed shapes for a compiled model). Call the model with
    `use_cache=False` and no attention mask.
    """
    if not rows:
        raise ValueError("packed_collate needs at least one row")
    if pad_id is None:
        seqs = [
            (
                list(chain.from_iterable(r.input_ids for r in rows)),
                list(chain.from_iterable(r.labels for r in rows)),
                list(chain.from_iterable(r.position_ids for r in rows)),
            )
        ]
    else:
        longest = max(len(r) for r in rows)
        if max_seq_length is not None and longest > max_seq_length:
            raise ValueError(
                f"a packed row of {longest} tokens does not fit the fixed width {max_seq_length}"
            )
        width = max_seq_length or longest
        seqs = [
            (
                r.input_ids + [pad_id] * (width - len(r)),
                r.labels + [IGNORE_INDEX] * (width - len(r)),
                r.position_ids + list(range(width - len(r))),
            )
            for r in rows
        ]
        seqs += [([pad_id] * width, [IGNORE_INDEX] * width, list(range(width)))] * max(
            0, min_rows - len(rows)
        )
    ids, labels, pos = (torch.tensor(list(col), dtype=torch.long) for col in zip(*seqs))
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def packing_efficiency(rows: Sequence[PackedRow], max_seq_length: int) -> float:
    """Real tokens / (rows * max_seq_length): the fraction of a fixed-size batch that is not padding."""
    if not len(rows):
        return 0.0
    lengths = getattr(rows, "lengths", None)
    total = int(np.sum(lengths)) if lengths is not None else sum(len(r) for r in rows)
    return total / (len(rows) * max_seq_length)
