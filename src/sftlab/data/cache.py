"""On-disk cache of one source's tokenized, masked examples (before length policy and mixing).

An entry is keyed by a sha256 over: the source's content fingerprint (its files' bytes, or the
dataset fingerprint), the tokenizer's serialized state (vocab, merges, added and special tokens),
the chat template text, the source format, its `columns` / `roles` renaming, `loss_on`, `data.tools`, its
response/instruction templates (when set), the Python API's formatting function (when given), and
the code that turns rows into examples; for a vision-language model also the processor's settings
and `max_seq_length` (over-length image rows are bad rows, not truncated ones). The image files an
entry names are recorded in its image_files.jsonl and checked (size, mtime) when it is opened: a changed or
missing one rebuilds it. `max_seq_length`, weights, the seed and the eval split are applied after loading, so
changing them reuses the entry.

An entry is a directory `<cache_dir>/<key>/` holding the flat token arrays of `data/arrays.py`
(ids, target flags, offsets, locations, image references; each chunk checksummed) and `meta.json` (format version,
key parts, row and bad-row counts, the first bad rows, the files, the rows read as each format,
the unknown fields seen, the rows using each `columns` / `roles` entry and the rows whose tools were
dropped). It is written into a temporary
directory beside it and renamed into place, so readers never see a half-written entry and
concurrent writers (one per rank) are harmless. Opening an entry re-checks every checksum; a
truncated or corrupted entry is reported, removed and rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.data.arrays import CorruptEntry, TokenArrays
from sftlab.paths import cache_root

log = logging.getLogger(__name__)

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
    "arrays.py",
    "fast_chatml.py",
    "cache.py",
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
        """Where the example whose tokens begin at token `start` of the arrays came from."""
        assert self.arrays is not None
        return self.where(int(np.searchsorted(self.arrays.offsets, start, side="right")) - 1)

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
