"""Tokenized examples as flat arrays on disk, written in chunks and opened memory-mapped.

One directory holds one source's examples (a cache entry, or a temporary directory when the cache
is off). Raw little-endian binary files, described by `arrays.json`; no pickle anywhere:

    ids.bin      uint16 or uint32 [tokens]   (uint16 when the vocabulary fits)
    targets.bin  uint8  [tokens]              1 = the token is a target (its label is its own id)
    offsets.bin  int64  [examples + 1]        example i is tokens offsets[i]:offsets[i+1]
    lines.bin    int64  [examples]            the line (JSONL) or row of each example, 1-based ...
    files.bin    int32  [examples]            ... and which file it came from
    fix_pos.bin  int64  [k], fix_val.bin int32 [k]   labels that are neither -100 nor the token's
                 own id (only pretokenized rows can have them; almost always empty)

    images.jsonl one JSON list per example: its image references in order (vision-language sources
                 only): absolute paths, or paths relative to the entry (images a Dataset held in
                 memory, written there as PNG files); opened memory-mapped with one int64 line
                 offset per example (`ImageRefs`), each example's line parsed when it is asked for

Labels are thus stored as one byte per token instead of a second full-width copy:
`label = id if target else -100`, then the few fixes applied.

Integrity: every array is appended chunk by chunk, and the sha256 of each chunk is recorded with
its size. `TokenArrays(path)` checks every file's size and re-hashes every chunk when it opens an
entry (a sequential read); a truncated, extended or flipped byte raises `CorruptEntry`.

Worker processes (`num_proc`) write a chunk's token arrays to files of their own
(`write_chunk_files`); the main process appends those files to the entry with
`os.copy_file_range` (inside the kernel, no copy through its memory) and records the hashes the
workers computed while writing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sftlab.data.types import IGNORE_INDEX
from sftlab.errors import SftlabError

ARRAYS_FORMAT = 1
TOKEN_ARRAYS = ("ids", "targets")  # per token: written by the workers
META_ARRAYS = {"offsets": "int64", "lines": "int64", "files": "int32", "fix_pos": "int64", "fix_val": "int32"}
HASH_BLOCK = 1 << 22
IMAGES_FILE = "images.jsonl"


class CorruptEntry(SftlabError, ValueError):
    """An array file does not match the sizes and checksums recorded when it was written."""


def id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def write_chunk_files(
    directory: Path, stem: str, arrays: dict[str, np.ndarray]
) -> dict[str, tuple[str, int, str]]:
    """Write each array to `<directory>/<stem>.<name>.bin`; return name -> (path, bytes, sha256)."""
    out = {}
    for name, arr in arrays.items():
        data = np.ascontiguousarray(arr).tobytes()
        path = directory / f"{stem}.{name}.bin"
        path.write_bytes(data)
        out[name] = (str(path), len(data), _digest(data))
    return out


class ArrayWriter:
    """Appends chunks to the arrays of one entry directory and records each chunk's size and sha256."""

    def __init__(self, directory: Path, ids_dtype: str, images: bool = False):
        self.directory = Path(directory)
        self.images = open(self.directory / IMAGES_FILE, "wb") if images else None
        self.image_chunks: list[tuple[int, str]] = []
        self.dtypes = {"ids": ids_dtype, "targets": "uint8", **META_ARRAYS}
        self.chunks: dict[str, list[tuple[int, str]]] = {name: [] for name in self.dtypes}
        self.handles = {name: open(self.directory / f"{name}.bin", "wb") for name in self.dtypes}
        self.tokens = 0
        self.examples = 0
        self.append("offsets", np.zeros(1, dtype=np.int64))

    def append(self, name: str, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr, dtype=self.dtypes[name]).tobytes()
        if data:
            self.handles[name].write(data)
            self.chunks[name].append((len(data), _digest(data)))

    def append_file(self, name: str, path: str, nbytes: int, sha: str) -> None:
        """Append a chunk a worker wrote (`write_chunk_files`), then delete its file."""
        if nbytes:
            out = self.handles[name]
            out.flush()
            with open(path, "rb") as src:
                copied = 0
                try:
                    while copied < nbytes:
                        n = os.copy_file_range(src.fileno(), out.fileno(), nbytes - copied)
                        if n == 0:
                            break
                        copied += n
                except (AttributeError, OSError):  # no copy_file_range here: a buffered copy
                    src.seek(copied)
                    out.seek(0, os.SEEK_END)
                    shutil.copyfileobj(src, out)
                    copied = nbytes
                out.seek(0, os.SEEK_END)
            self.chunks[name].append((nbytes, sha))
        os.unlink(path)

    def add_examples(
        self,
        lengths: np.ndarray,
        lines: np.ndarray,
        files: np.ndarray,
        fix_pos: np.ndarray,
        fix_val: np.ndarray,
    ) -> None:
        """The per-example metadata of a chunk whose tokens were just appended (fix positions chunk-local)."""
        self.append("offsets", self.tokens + np.cumsum(lengths, dtype=np.int64))
        self.append("lines", lines)
        self.append("files", files)
        self.append("fix_pos", self.tokens + np.asarray(fix_pos, dtype=np.int64))
        self.append("fix_val", fix_val)
        self.tokens += int(np.sum(lengths, dtype=np.int64))
        self.examples += len(lengths)

    def add_images(self, refs: Sequence[Sequence[str]]) -> None:
        """The image references of the examples just added, one list per example."""
        data = b"".join(json.dumps(list(r)).encode() + b"\n" for r in refs)
        if data:
            self.images.write(data)
            self.image_chunks.append((len(data), _digest(data)))

    def close(self) -> dict[str, Any]:
        """Flush and write `arrays.json`; returns its content. No fsync: the entry is derived data whose
        every chunk is checksummed, so one torn by a crash is detected when opened and rebuilt."""
        self.abort()
        meta = {
            "format": ARRAYS_FORMAT,
            "tokens": self.tokens,
            "examples": self.examples,
            "arrays": {
                name: {"dtype": self.dtypes[name], "chunks": self.chunks[name]} for name in self.dtypes
            },
        }
        if self.images is not None:
            meta["images"] = {"chunks": self.image_chunks}
        (self.directory / "arrays.json").write_text(json.dumps(meta), encoding="utf-8")
        return meta

    def abort(self) -> None:
        for handle in [*self.handles.values(), *([self.images] if self.images is not None else [])]:
            handle.close()


def _verify(path: Path, chunks: list[list]) -> None:
    expected = sum(n for n, _ in chunks)
    size = path.stat().st_size
    if size != expected:
        raise CorruptEntry(f"{path.name}: {size} bytes, {expected} were written")
    with open(path, "rb") as f:
        for k, (n, sha) in enumerate(chunks):
            h = hashlib.sha256()
            left = n
            while left:
                block = f.read(min(left, HASH_BLOCK))
                if not block:
                    raise CorruptEntry(f"{path.name}: ends inside chunk {k}")
                h.update(block)
                left -= len(block)
            if h.hexdigest() != sha:
                raise CorruptEntry(f"{path.name}: chunk {k} does not match its checksum")


class ImageRefs:
    """Every example's image references, read from images.jsonl (memory-mapped) when asked for: the entry
    holds one int64 line offset per example, not a Python object per reference (`refs[i]`: example i's
    references, relative ones, written into the entry, made absolute; iterating streams them all)."""

    def __init__(self, directory: Path, chunks: list[list], verify: bool):
        path = directory / IMAGES_FILE
        if verify:
            _verify(path, chunks)
        self.base = str(directory.resolve())
        size = sum(n for n, _ in chunks)
        self.data = (
            np.memmap(path, dtype=np.uint8, mode="r", shape=(size,)) if size else np.zeros(0, np.uint8)
        )
        ends = [np.zeros(1, dtype=np.int64)]
        for start in range(0, size, HASH_BLOCK):  # newline positions, a block at a time
            block = np.asarray(self.data[start : start + HASH_BLOCK])
            ends.append(np.flatnonzero(block == 0x0A).astype(np.int64) + start + 1)
        self.starts = np.concatenate(ends)  # line i is data[starts[i]:starts[i + 1]]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i: int) -> tuple[str, ...]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} of {len(self)}")
        i %= len(self)
        line = bytes(self.data[self.starts[i] : self.starts[i + 1]])
        return tuple(r if os.path.isabs(r) else os.path.join(self.base, r) for r in json.loads(line))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _open(path: Path, dtype: str, chunks: list[list]) -> np.ndarray:
    count = sum(n for n, _ in chunks) // np.dtype(dtype).itemsize
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenArrays:
    """An entry's arrays, memory-mapped read-only (verified against their checksums unless told not to)."""

    def __init__(self, directory: Path, verify: bool = True):
        self.directory = Path(directory)
        try:
            meta = json.loads((self.directory / "arrays.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CorruptEntry(f"arrays.json: {e}") from None
        if meta.get("format") != ARRAYS_FORMAT:
            raise CorruptEntry(f"arrays.json: format {meta.get('format')}, expected {ARRAYS_FORMAT}")
        self.meta = meta
        arrays: dict[str, np.ndarray] = {}
        for name, spec in meta["arrays"].items():
            path = self.directory / f"{name}.bin"
            if verify:
                _verify(path, spec["chunks"])
            arrays[name] = _open(path, spec["dtype"], spec["chunks"])
        self.ids, self.targets, self.offsets = arrays["ids"], arrays["targets"], arrays["offsets"]
        self.lines, self.files = arrays["lines"], arrays["files"]
        self.fix_pos, self.fix_val = np.asarray(arrays["fix_pos"]), np.asarray(arrays["fix_val"])
        self.images = (
            ImageRefs(self.directory, meta["images"]["chunks"], verify) if "images" in meta else None
        )
        if self.images is not None and len(self.images) != meta["examples"]:
            raise CorruptEntry(
                f"{IMAGES_FILE}: {len(self.images)} examples, arrays.json says {meta['examples']}"
            )
        if (
            len(self.offsets) != meta["examples"] + 1
            or meta["tokens"] != len(self.ids)
            or meta["tokens"] != len(self.targets)
        ):
            raise CorruptEntry("array lengths disagree with arrays.json")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def digest(self) -> str:
        """An id of the content: the sha256 over every chunk's checksum (image references included)."""
        return _digest(json.dumps([self.meta["arrays"], self.meta.get("images")], sort_keys=True).encode())

    def example_images(self, start: int) -> tuple[str, ...]:
        """The image references of the example whose tokens begin at token `start` (none without images)."""
        if self.images is None:
            return ()
        return self.images[int(np.searchsorted(self.offsets, start, side="right")) - 1]

    def tokens(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, aligned labels) of tokens [start, stop), as int64 arrays."""
        ids = self.ids[start:stop].astype(np.int64)
        labels = np.where(self.targets[start:stop] != 0, ids, IGNORE_INDEX)
        if len(self.fix_pos):
            a, b = np.searchsorted(self.fix_pos, [start, stop])
            labels[self.fix_pos[a:b] - start] = self.fix_val[a:b]
        return ids, labels

    def count_targets(self, start: int, stop: int) -> int:
        """Target tokens among [start, stop), the first never counting (it is never predicted)."""
        if stop - start < 2:
            return 0
        if len(self.fix_pos):
            return int(np.count_nonzero(self.tokens(start + 1, stop)[1] != IGNORE_INDEX))
        return int(np.count_nonzero(self.targets[start + 1 : stop]))


def example_arrays(
    ids: Sequence[int], labels: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, targets, fix positions, fix values) of one example in the compact form."""
    ids_a = np.asarray(ids, dtype=np.int64)
    labels_a = np.asarray(labels, dtype=np.int64)
    targets = labels_a == ids_a
    fixes = np.flatnonzero(~targets & (labels_a != IGNORE_INDEX))
    return ids_a, targets.astype(np.uint8), fixes, labels_a[fixes]
