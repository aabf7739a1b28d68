"""A train or eval set as indices into memory-mapped token arrays, never as Python lists of tokens.

`Examples` is a sequence of examples: example i is tokens [start[i], start[i] + length[i]) of
store[i] (a `TokenArrays`). Truncation shortens `length`, mixing and the eval split select and
repeat indices; the tokens stay on disk (memory-mapped) until a micro-batch is built. Indexing
gives a `TokenizedExample` (lists, built on demand); `arrays(i)` gives int64 numpy arrays.
The per-example cost in memory is 16 bytes. A vision-language store keeps each example's image
references beside its tokens (arrays.py `images.jsonl`); they are found from the example's start, so
mixing, selection and the eval split carry them without an index of their own, and indexing gives a
`VisionExample` whose images the collate step loads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import overload

import numpy as np

from sftlab.data.arrays import TokenArrays
from sftlab.data.types import TokenizedExample, VisionExample


class Examples(Sequence[TokenizedExample]):
    def __init__(
        self, stores: Sequence[TokenArrays], store: np.ndarray, start: np.ndarray, length: np.ndarray
    ):
        self.stores = list(stores)
        self.store = np.asarray(store, dtype=np.int32)
        self.start = np.asarray(start, dtype=np.int64)
        self.length = np.asarray(length, dtype=np.int64)
        if not len(self.store) == len(self.start) == len(self.length):
            raise ValueError("store, start and length must have one entry per example")

    @classmethod
    def whole(cls, arrays: TokenArrays) -> Examples:
        """Every example of one store, in order."""
        n = len(arrays)
        return cls([arrays], np.zeros(n, dtype=np.int32), arrays.offsets[:-1], arrays.lengths)

    @classmethod
    def empty(cls) -> Examples:
        return cls([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        """The examples of every part, in order (their stores listed once each)."""
        stores: list[TokenArrays] = []
        where: dict[int, int] = {}
        store_cols = []
        for part in parts:
            remap = np.zeros(len(part.stores), dtype=np.int32)
            for k, s in enumerate(part.stores):
                if id(s) not in where:
                    where[id(s)] = len(stores)
                    stores.append(s)
                remap[k] = where[id(s)]
            store_cols.append(remap[part.store] if len(part.store) else part.store)
        if not parts:
            return cls.empty()
        return cls(
            stores,
            np.concatenate(store_cols),
            np.concatenate([p.start for p in parts]),
            np.concatenate([p.length for p in parts]),
        )

    def select(self, indices: np.ndarray | Sequence[int]) -> Examples:
        """The examples at `indices` (repeats allowed), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return Examples(self.stores, self.store[idx], self.start[idx], self.length[idx])

    def __len__(self) -> int:
        return len(self.length)

    @property
    def lengths(self) -> np.ndarray:
        return self.length

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum())

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, aligned labels) of example i, as int64 arrays."""
        a = int(self.start[i])
        return self.stores[self.store[i]].tokens(a, a + int(self.length[i]))

    def images(self, i: int) -> tuple[str, ...]:
        """The image references of example i (none for a text-only store)."""
        return self.stores[self.store[i]].example_images(int(self.start[i]))

    @property
    def has_images(self) -> bool:
        return any(s.images is not None for s in self.stores)

    def num_targets(self, i: int) -> int:
        a = int(self.start[i])
        return self.stores[self.store[i]].count_targets(a, a + int(self.length[i]))

    @overload
    def __getitem__(self, i: int) -> TokenizedExample: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenizedExample]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i %= len(self)
        ids, labels = self.arrays(i)
        if self.stores[self.store[i]].images is not None:
            return VisionExample(ids.tolist(), labels.tolist(), self.images(i))
        return TokenizedExample(ids.tolist(), labels.tolist())

    def fingerprint(self) -> str:
        """Identifies exactly these examples: the stores' content digests and the index arrays."""
        h = hashlib.sha256()
        for s in self.stores:
            h.update(s.digest().encode())
        for arr in (self.store, self.start, self.length):
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:32]
