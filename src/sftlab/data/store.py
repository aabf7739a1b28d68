"""The stored token arrays of every source: written in checksummed chunks, cached under a content key,
opened memory-mapped, and indexed as `Examples` (a train or eval set).

One concern, from the arrays a chunk of rows became to the example a micro-batch asks for: where each
token lives and how it is found again. This is also where the unit of data is defined. An example is a
GROUP of k >= 1 token sequences (each its ids and aligned labels), with optional side values (one number
per example per side array, e.g. a weight). Supervised fine-tuning's examples are groups of one sequence
with no side value, written without a group layout; a preference pair is a group of two (chosen, then
rejected). The layout is recorded by the store, selected, truncated and fingerprinted group by group by
`Examples`, and laid out as a batch by data/collate.py.

## The arrays

One directory holds one source's examples (a cache entry, or a temporary directory when the cache
is off). Raw little-endian binary files, described by `arrays.json`; no pickle anywhere:

    ids.bin      uint16 or uint32 [tokens]   (uint16 when the vocabulary fits)
    targets.bin  uint8  [tokens]              1 = the token is a target (its label is its own id)
    offsets.bin  int64  [sequences + 1]       sequence j is tokens offsets[j]:offsets[j+1]
    lines.bin    int64  [examples]            the line (JSONL) or row of each example, 1-based ...
    files.bin    int32  [examples]            ... and which file it came from
    fix_pos.bin  int64  [k], fix_val.bin int32 [k]   labels that are neither -100 nor the token's
                 own id (only pretokenized rows can have them; almost always empty)
    groups.bin   int64  [examples + 1]        example i is sequences groups[i]:groups[i+1] (a store
                 written with a group layout, `ArrayWriter(groups=True)`, whose arrays.json also
                 counts its `sequences`)
    side.<name>.bin  [examples]               a side array of a grouped store, e.g. side.weight.bin
    images.jsonl one JSON list per sequence: its image references in order (vision-language sources
                 only): absolute paths, or paths relative to the entry (images a Dataset held in
                 memory, written there as PNG files); opened memory-mapped with one int64 line
                 offset per sequence (`ImageRefs`), each line parsed when it is asked for

Without a group layout (every source a row format reads today) there is no groups.bin and every
example is one sequence: the files are exactly those of an SFT store before groups existed. The
layout's arrays are listed in arrays.json with their checksums, so the content digest (`digest`,
hence every data fingerprint) tells a grouped store from an SFT store of the same tokens.

Labels are stored as one byte per token instead of a second full-width copy:
`label = id if target else -100`, then the few fixes applied.

Integrity: every array is appended chunk by chunk, and the sha256 of each chunk is recorded with
its size. `TokenArrays(path)` checks every file's size and re-hashes every chunk when it opens an
entry (a sequential read); a truncated, extended or flipped byte raises `CorruptEntry`.

Worker processes (`num_proc`) write a chunk's token arrays to files of their own
(`write_chunk_files`); the main process appends those files to the entry with
`os.copy_file_range` (inside the kernel, no copy through its memory) and records the hashes the
workers computed while writing.

## The cache

An entry is keyed by a sha256 over: the source's content fingerprint (its files' bytes, or the
dataset fingerprint), the tokenizer's serialized state (vocab, merges, added and special tokens),
the chat template text, the source format, its `columns` / `roles` renaming, `loss_on`, `data.tools`, its
response/instruction templates (when set), the Python API's formatting function (when given), and
the code that turns rows into examples (this module included); for a vision-language model also the
processor's settings and `max_seq_length` (over-length image rows are bad rows, not truncated ones). The
group layout a source's rows give follows from its format and that code, so it is part of the key too,
and the entry records it (arrays.json, checksummed). The image files an entry names are recorded in its
image_files.jsonl and checked (size, mtime) when it is opened: a changed or missing one rebuilds it.
`max_seq_length`, weights, the seed and the eval split are applied after loading, so changing them
reuses the entry.

An entry is a directory `<cache_dir>/<key>/` holding the arrays above and `meta.json` (format version,
key parts, row and bad-row counts, the first bad rows, the files, the rows read as each format,
the unknown fields seen, the rows using each `columns` / `roles` entry and the rows whose tools were
dropped). It is written into a temporary directory beside it and renamed into place, so readers never
see a half-written entry and concurrent writers (one per rank) are harmless. Opening an entry re-checks
every checksum; a truncated or corrupted entry is reported, removed and rebuilt, never trained on.

## Examples

`Examples` is a sequence of examples as index arrays, never as Python lists of tokens: its ROWS are
sequences, row r being tokens [start[r], start[r] + length[r]) of stores[store[r]] (16 bytes a row), and
with a group layout `group` (int64 [examples + 1]) says example i is rows group[i]:group[i + 1]; without
one (`group` None) row i is example i. The length policy shortens `length` (each member of a group;
a group is kept or dropped whole), mixing and the eval split select and repeat whole examples; the
tokens stay on disk until a micro-batch is built. Indexing gives a `TokenizedExample` (lists, built on
demand) without a group layout, a `TokenGroup` (its members, its side values) with one; `arrays(i)`
gives an ungrouped example's int64 numpy arrays. A vision-language store keeps each sequence's image
references beside its tokens; they are found from the sequence's start, so mixing, selection and the
eval split carry them without an index of their own, and indexing gives a `VisionExample` whose images
the collate step loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.data.types import IGNORE_INDEX, TokenGroup, TokenizedExample, VisionExample
from sftlab.errors import SftlabError
from sftlab.paths import cache_root

log = logging.getLogger(__name__)

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


def _side_names(side: dict[str, str], groups: bool) -> tuple[str, ...]:
    """The side arrays' names, checked: a grouped store's, identifiers, none named as a batch's group keys
    (data/collate.py: `group_index`, `group_member`; a side array `weight` becomes `group_weight`)."""
    if side and not groups:
        raise ValueError("side arrays belong to a group layout: ArrayWriter(..., groups=True)")
    for name in side:
        if not name.isidentifier() or name in ("index", "member"):
            raise ValueError(
                f"side array {name!r}: its name must be an identifier other than index and member"
            )
    return tuple(side)


class ArrayWriter:
    """Appends chunks to the arrays of one entry directory and records each chunk's size and sha256.

    `groups=True` records a group layout (groups.bin: each example's sequences) and the side arrays
    `side` (name -> dtype, one value per example); without it every example is one sequence (SFT)."""

    def __init__(
        self,
        directory: Path,
        ids_dtype: str,
        images: bool = False,
        groups: bool = False,
        side: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        self.grouped, self.side = groups, _side_names(dict(side or {}), groups)
        self.images = open(self.directory / IMAGES_FILE, "wb") if images else None
        self.image_chunks: list[tuple[int, str]] = []
        self.dtypes = {"ids": ids_dtype, "targets": "uint8", **META_ARRAYS}
        if groups:
            self.dtypes.update({"groups": "int64", **{f"side.{k}": v for k, v in (side or {}).items()}})
        self.chunks: dict[str, list[tuple[int, str]]] = {name: [] for name in self.dtypes}
        self.handles = {name: open(self.directory / f"{name}.bin", "wb") for name in self.dtypes}
        self.tokens = 0
        self.sequences = 0
        self.examples = 0
        self.append("offsets", np.zeros(1, dtype=np.int64))
        if groups:
            self.append("groups", np.zeros(1, dtype=np.int64))

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
        group_sizes: np.ndarray | None = None,
        side: dict[str, np.ndarray] | None = None,
    ) -> None:
        """The metadata of a chunk whose tokens were just appended (fix positions chunk-local): `lengths`
        per sequence, `lines` and `files` per example; a grouped store also takes each example's number of
        sequences (`group_sizes`, in order) and its side values (`side`: name -> one value per example)."""
        self.append("offsets", self.tokens + np.cumsum(lengths, dtype=np.int64))
        self.append("lines", lines)
        self.append("files", files)
        self.append("fix_pos", self.tokens + np.asarray(fix_pos, dtype=np.int64))
        self.append("fix_val", fix_val)
        self._add_groups(len(lengths), len(lines), group_sizes, side or {})
        self.tokens += int(np.sum(lengths, dtype=np.int64))
        self.sequences += len(lengths)
        self.examples += len(lines)

    def _add_groups(
        self, sequences: int, examples: int, group_sizes: np.ndarray | None, side: dict[str, np.ndarray]
    ) -> None:
        if not self.grouped:
            if group_sizes is not None or side or sequences != examples:
                raise ValueError("groups of several sequences, or side arrays, need ArrayWriter(groups=True)")
            return
        sizes = np.asarray(np.ones(examples) if group_sizes is None else group_sizes, dtype=np.int64)
        if len(sizes) != examples or np.any(sizes < 1) or int(sizes.sum()) != sequences:
            raise ValueError(
                f"group_sizes: one size >= 1 for each of the {examples} examples, "
                f"adding up to the {sequences} sequences"
            )
        if sorted(side) != sorted(self.side) or any(len(v) != examples for v in side.values()):
            raise ValueError(f"side arrays: one value per example for each of {list(self.side)}")
        self.append("groups", self.sequences + np.cumsum(sizes))
        for name in self.side:
            self.append(f"side.{name}", np.asarray(side[name]))

    def add_images(self, refs: Sequence[Sequence[str]]) -> None:
        """The image references of the sequences just added, one list per sequence."""
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
            **({"sequences": self.sequences} if self.grouped else {}),
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
    """Every sequence's image references, read from images.jsonl (memory-mapped) when asked for: the entry
    holds one int64 line offset per sequence, not a Python object per reference (`refs[i]`: sequence i's
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
        self.groups: np.ndarray | None = arrays.get("groups")  # None: every example one sequence
        self.side = {name[len("side.") :]: a for name, a in arrays.items() if name.startswith("side.")}
        self.images = (
            ImageRefs(self.directory, meta["images"]["chunks"], verify) if "images" in meta else None
        )
        self._check_lengths()

    def _check_lengths(self) -> None:
        meta, examples = self.meta, self.meta["examples"]
        sequences = meta.get("sequences", examples)
        if self.images is not None and len(self.images) != sequences:
            unit = "sequences" if self.groups is not None else "examples"
            raise CorruptEntry(f"{IMAGES_FILE}: {len(self.images)} {unit}, arrays.json says {sequences}")
        if (
            len(self.offsets) != sequences + 1
            or meta["tokens"] != len(self.ids)
            or meta["tokens"] != len(self.targets)
            or (
                self.groups is not None and (len(self.groups) != examples + 1 or self.groups[-1] != sequences)
            )
            or any(len(a) != examples for a in self.side.values())
        ):
            raise CorruptEntry("array lengths disagree with arrays.json")

    def __len__(self) -> int:
        """The number of examples (groups); `lengths` has one entry per sequence."""
        return self.meta["examples"]

    @property
    def lengths(self) -> np.ndarray:
        """Each sequence's number of tokens."""
        return np.diff(self.offsets)

    def digest(self) -> str:
        """An id of the content: the sha256 over every chunk's checksum (image references and the group
        layout included)."""
        return _digest(json.dumps([self.meta["arrays"], self.meta.get("images")], sort_keys=True).encode())

    def example_of(self, start: int) -> int:
        """The example holding the sequence whose tokens begin at token `start`."""
        sequence = int(np.searchsorted(self.offsets, start, side="right")) - 1
        if self.groups is None:
            return sequence
        return int(np.searchsorted(self.groups, sequence, side="right")) - 1

    def images_at(self, start: int) -> tuple[str, ...]:
        """The image references of the sequence whose tokens begin at token `start` (none without images)."""
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
    """(ids, targets, fix positions, fix values) of one sequence in the compact form."""
    ids_a = np.asarray(ids, dtype=np.int64)
    labels_a = np.asarray(labels, dtype=np.int64)
    targets = labels_a == ids_a
    fixes = np.flatnonzero(~targets & (labels_a != IGNORE_INDEX))
    return ids_a, targets.astype(np.uint8), fixes, labels_a[fixes]


# --- the cache -----------------------------------------------------------------------------------

CACHE_FORMAT = 2
MAX_BAD_EXAMPLES = 5
IMAGE_FILES = "image_files.jsonl"  # [path, bytes, mtime_ns] per line: the image files an entry names
# The modules whose code decides what a row tokenizes to: editing them invalidates the cache.
_CODE_FILES = (
    "types.py",
    "records.py",
    "rendering.py",
    "templates.py",
    "sources.py",
    "tokenize.py",
    "dataset.py",
    "store.py",
    "fast_chatml.py",
    "toolcalls.py",
    "markers.py",
    "images.py",
    "vision.py",
    "../config/fields.py",
)  # the row formats' declarations (ROW_FORMATS)


@dataclass
class SourceData:
    """One source's examples (memory-mapped arrays) and what reading it found: rows, bad rows, files."""

    arrays: TokenArrays | None = None
    files: list[tuple[str, str]] = field(default_factory=list)  # (file or source name, "line" | "row")
    rows: int = 0
    bad: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)  # the first few, in row order
    cached: bool = False
    notes: list[str] = field(default_factory=list)  # e.g. which tokenization path was used
    conversations: int = 0  # chat rows read (the rest: text or pretokenized)
    formats: Counter = field(default_factory=Counter)  # format -> rows read as it
    unknown: Counter = field(
        default_factory=Counter
    )  # field no reader of its format reads -> rows holding it
    tools_dropped: int = 0  # rows whose tools the template does not render, dropped (data.tools: drop)
    mapped: Counter = field(
        default_factory=Counter
    )  # `columns.<name>` / `roles.<name>` entry -> rows using it
    image_files: int = (
        0  # image files outside the entry, their [path, bytes, mtime_ns] in its image_files.jsonl
    )

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays is not None else 0

    def where(self, i: int) -> str:
        assert self.arrays is not None
        name, unit = self.files[int(self.arrays.files[i])]
        line = int(self.arrays.lines[i])
        return f"{name}:{line}" if unit == "line" else f"{name} row {line}"

    def where_token(self, start: int) -> str:
        """Where the example holding the sequence whose tokens begin at token `start` came from."""
        assert self.arrays is not None
        return self.where(self.arrays.example_of(start))

    def meta(self, key_parts: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "key": key_parts,
            "rows": self.rows,
            "bad": self.bad,
            "bad_reasons": dict(self.bad_reasons),
            "bad_examples": self.bad_examples,
            "files": [list(f) for f in self.files],
            "notes": self.notes,
            "formats": dict(self.formats),
            "unknown": dict(self.unknown),
            "tools_dropped": self.tools_dropped,
            "mapped": dict(self.mapped),
            **({"image_files": self.image_files} if self.image_files else {}),
        }


def default_cache_dir() -> Path:
    """$SFTLAB_DATA_CACHE, else $SFTLAB_CACHE/data (default ~/.cache/sftlab/data)."""
    return (
        Path(os.environ["SFTLAB_DATA_CACHE"])
        if os.environ.get("SFTLAB_DATA_CACHE")
        else cache_root() / "data"
    )


def cache_dir(cfg_cache_dir: str | None) -> Path:
    """Where the data cache lives: `data.cache_dir` when set, else `default_cache_dir()`."""
    return Path(cfg_cache_dir).expanduser() if cfg_cache_dir else default_cache_dir()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of everything in the tokenizer that changes token ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocab, merges, added tokens, normalizer, post-processor
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode()
    )
    h.update(json.dumps(sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items())).encode())
    h.update(str(len(tokenizer)).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256(str(CACHE_FORMAT).encode())
    for name in _CODE_FILES:
        if (here / name).is_file():
            h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()


def write_image_identities(arrays: TokenArrays | None, path: Path) -> int:
    """Write [path, bytes, mtime_ns] of every image file the examples name outside their own directory, one
    JSON line per file (each once), to `path`; returns how many. Streamed: the references are told apart
    by 64-bit digests in one array (a collision would leave one file unchecked; odds ~n^2/2^65)."""
    if arrays is None or arrays.images is None:
        return 0
    inside = str(arrays.directory.resolve()) + os.sep

    def outside():
        return (r for refs in arrays.images for r in refs if not r.startswith(inside))

    digests = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(r.encode(), digest_size=8).digest(), "little", signed=True)
            for r in outside()
        ),
        dtype=np.int64,
    )
    first = np.zeros(len(digests), dtype=bool)
    first[np.unique(digests, return_index=True)[1]] = True
    with open(path, "w", encoding="utf-8") as f:
        for keep, ref in zip(first, outside()):
            if keep:
                st = os.stat(ref)
                f.write(json.dumps([ref, st.st_size, st.st_mtime_ns]) + "\n")
    return int(first.sum())


def changed_images(entry: Path, count: int) -> str | None:
    """The first image file recorded in the entry (`count` of them) that is gone or differs from when the
    entry was written; None when all hold."""
    if not count:
        return None
    with open(entry / IMAGE_FILES, encoding="utf-8") as f:
        for line in f:
            path, size, mtime = json.loads(line)
            try:
                st = os.stat(path)
            except OSError:
                return f"{path} is gone"
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                return f"{path} changed"
    return None


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the key parts (strings, numbers, None)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load(root: Path, key: str) -> SourceData | None:
    """The entry for `key`, verified; None when absent, outdated or corrupted (then it is rebuilt)."""
    entry = root / key
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            return None
        changed = changed_images(entry, meta.get("image_files", 0))
        if changed:
            log.info("data cache entry %s: image %s since it was written: rebuilding it", entry, changed)
            return None
        arrays = TokenArrays(entry)
    except (OSError, ValueError) as e:  # CorruptEntry is a ValueError
        why = f"corrupted ({e})" if isinstance(e, CorruptEntry) else f"unreadable ({e})"
        log.warning("data cache entry %s is %s: removing it and rebuilding it", entry, why)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return SourceData(
        arrays,
        files=[(name, unit) for name, unit in meta["files"]],
        rows=meta["rows"],
        bad=meta["bad"],
        bad_reasons=Counter(meta["bad_reasons"]),
        bad_examples=meta["bad_examples"],
        cached=True,
        notes=meta.get("notes", []),
        formats=Counter(meta.get("formats", {})),
        unknown=Counter(meta.get("unknown", {})),
        tools_dropped=meta.get("tools_dropped", 0),
        mapped=Counter(meta.get("mapped", {})),
        image_files=meta.get("image_files", 0),
    )


def new_entry_dir(root: Path, key: str) -> Path:
    """A fresh temporary directory beside the entry, to write it into."""
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{key[:8]}-", dir=root))


def commit(tmp: Path, root: Path, key: str, data: SourceData, key_parts: dict[str, Any]) -> Path:
    """Write meta.json and rename the finished directory into place; returns the entry's path."""
    data.image_files = write_image_identities(data.arrays, tmp / IMAGE_FILES)
    (tmp / "meta.json").write_text(json.dumps(data.meta(key_parts), indent=1), encoding="utf-8")
    final = root / key
    if final.exists():  # unreadable or outdated entry: replace it
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").is_file():  # not a concurrent writer finishing first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- Examples --------------------------------------------------------------------------------------


def _group_rows(group: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, new group offsets) of the examples `idx` of a layout `group`, in that order."""
    first = group[idx]
    sizes = group[idx + 1] - first
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    return np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - first, sizes), offsets


class Examples(Sequence[TokenizedExample | TokenGroup]):
    """Examples as index arrays into stores: row r is tokens [start[r], start[r] + length[r]) of
    stores[store[r]]; `group` (int64 [examples + 1], None: row i is example i) makes example i the rows
    group[i]:group[i + 1]. Selection, the length policy and the fingerprint act on whole examples."""

    def __init__(
        self,
        stores: Sequence[TokenArrays],
        store: np.ndarray,
        start: np.ndarray,
        length: np.ndarray,
        group: np.ndarray | None = None,
    ):
        self.stores = list(stores)
        self.store = np.asarray(store, dtype=np.int32)
        self.start = np.asarray(start, dtype=np.int64)
        self.length = np.asarray(length, dtype=np.int64)
        self.group = None if group is None else np.asarray(group, dtype=np.int64)
        if not len(self.store) == len(self.start) == len(self.length):
            raise ValueError("store, start and length must have one entry per row")
        if self.group is not None and (
            len(self.group) == 0 or self.group[0] != 0 or self.group[-1] != len(self.length)
        ):
            raise ValueError("group must be offsets from 0 to the number of rows")

    @classmethod
    def whole(cls, arrays: TokenArrays) -> Examples:
        """Every example of one store, in order (with its group layout, if it has one)."""
        n = len(arrays.lengths)
        return cls([arrays], np.zeros(n, dtype=np.int32), arrays.offsets[:-1], arrays.lengths, arrays.groups)

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
            _concat_groups(parts),
        )

    def select(self, indices: np.ndarray | Sequence[int]) -> Examples:
        """The examples at `indices` (repeats allowed), in that order; a group comes whole."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.group is None:
            return Examples(self.stores, self.store[idx], self.start[idx], self.length[idx])
        rows, group = _group_rows(self.group, idx)
        return Examples(self.stores, self.store[rows], self.start[rows], self.length[rows], group)

    def __len__(self) -> int:
        return len(self.length) if self.group is None else len(self.group) - 1

    @property
    def grouped(self) -> bool:
        """Whether the examples carry a group layout (indexing gives `TokenGroup`s)."""
        return self.group is not None

    def rows(self, i: int) -> range:
        """The rows (sequences) of example i."""
        return range(i, i + 1) if self.group is None else range(int(self.group[i]), int(self.group[i + 1]))

    def _per_example(self, reduce: np.ufunc) -> np.ndarray:
        if self.group is None:
            return self.length
        if not len(self):
            return np.zeros(0, dtype=np.int64)
        return reduce.reduceat(self.length, self.group[:-1])

    @property
    def lengths(self) -> np.ndarray:
        """Each example's tokens (a group's: all its members')."""
        return self._per_example(np.add)

    @property
    def longest(self) -> np.ndarray:
        """Each example's longest sequence: what the length policy compares to max_seq_length."""
        return self._per_example(np.maximum)

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum())

    def starts_over(self, i: int, max_seq_length: int) -> list[int]:
        """The first token (in its store) of each sequence of example i longer than max_seq_length."""
        return [int(self.start[r]) for r in self.rows(i) if self.length[r] > max_seq_length]

    def truncate(self, max_seq_length: int) -> None:
        """Cut every sequence (each member of a group) to at most max_seq_length tokens, in place."""
        np.minimum(self.length, max_seq_length, out=self.length)

    def sequence_arrays(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, aligned labels) of row r, as int64 arrays."""
        a = int(self.start[r])
        return self.stores[self.store[r]].tokens(a, a + int(self.length[r]))

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, aligned labels) of example i, as int64 arrays (an example of one sequence)."""
        if self.group is not None:
            raise ValueError(f"example {i} is a group of sequences: sequence_arrays(r) for r in rows({i})")
        return self.sequence_arrays(i)

    def images(self, i: int) -> tuple[str, ...]:
        """The image references of example i, its sequences' in order (none for a text-only store)."""
        return tuple(r for row in self.rows(i) for r in self._images(row))

    def _images(self, r: int) -> tuple[str, ...]:
        return self.stores[self.store[r]].images_at(int(self.start[r]))

    @property
    def has_images(self) -> bool:
        return any(s.images is not None for s in self.stores)

    def num_targets(self, i: int) -> int:
        return sum(
            self.stores[self.store[r]].count_targets(int(self.start[r]), int(self.start[r] + self.length[r]))
            for r in self.rows(i)
        )

    def side(self, i: int) -> dict[str, Any]:
        """Example i's side values (name -> a numpy scalar); none without a group layout."""
        r = self.rows(i)[0]
        store = self.stores[self.store[r]]
        if not store.side:
            return {}
        example = store.example_of(int(self.start[r]))
        return {name: values[example] for name, values in store.side.items()}

    def _sequence(self, r: int) -> TokenizedExample:
        ids, labels = self.sequence_arrays(r)
        if self.stores[self.store[r]].images is not None:
            return VisionExample(ids.tolist(), labels.tolist(), self._images(r))
        return TokenizedExample(ids.tolist(), labels.tolist())

    @overload
    def __getitem__(self, i: int) -> TokenizedExample | TokenGroup: ...
    @overload
    def __getitem__(self, i: slice) -> list[TokenizedExample | TokenGroup]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {i} out of range for {len(self)} examples")
        i %= len(self)
        if self.group is None:
            return self._sequence(i)
        return TokenGroup(tuple(self._sequence(r) for r in self.rows(i)), self.side(i))

    def fingerprint(self) -> str:
        """Identifies exactly these examples: the stores' content digests (their group layouts and side
        arrays included), the index arrays and the group offsets (if any)."""
        h = hashlib.sha256()
        for s in self.stores:
            h.update(s.digest().encode())
        for arr in (self.store, self.start, self.length):
            h.update(np.ascontiguousarray(arr).tobytes())
        if self.group is not None:
            h.update(b"groups" + np.ascontiguousarray(self.group).tobytes())
        return h.hexdigest()[:32]


def _concat_groups(parts: Sequence[Examples]) -> np.ndarray | None:
    """The group offsets of the concatenation of `parts` (None when none has a group layout)."""
    if all(p.group is None for p in parts):
        return None
    shift, out = 0, [np.zeros(1, dtype=np.int64)]
    for p in parts:
        group = p.group if p.group is not None else np.arange(len(p.length) + 1, dtype=np.int64)
        out.append(group[1:] + shift)
        shift += len(p.length)
    return np.concatenate(out)
