"""On-disk cache of one source's tokenized, masked examples (before length policy and mixing).

An entry is keyed by a sha256 over: the source's content fingerprint (its files' bytes, or the
dataset fingerprint), the tokenizer's serialized state (vocab, merges, added and special tokens),
the chat template text, the source format, `loss_on`, and the code that turns rows into
examples. `max_seq_length`, weights, the seed and the eval split are applied after loading, so
changing them reuses the entry.

An entry is a directory `<cache_dir>/<key>/` of flat numpy arrays (`np.save`, loaded with
`allow_pickle=False`) and a JSON file; no pickle anywhere:

    input_ids.npy  int32 [total tokens]     labels.npy  int32 [total tokens] (-100 = no loss)
    offsets.npy    int64 [examples + 1]     lines.npy   int64 [examples]  (line or row of each)
    files.npy      int32 [examples]         (index into meta.json "files")
    meta.json      format version, key parts, row and bad-row counts, first bad rows, files

It is written into a temporary directory beside it and renamed into place, so readers never see
a half-written entry and concurrent writers (one per rank) are harmless.
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

from sftlab.data.types import IGNORE_INDEX, TokenizedExample
from sftlab.paths import cache_root

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
MAX_BAD_EXAMPLES = 5
# The modules whose code decides what a row tokenizes to: editing them invalidates the cache.
_CODE_FILES = ("types.py", "formats.py", "masking.py", "templates.py", "sources.py", "dataset.py", "cache.py")


@dataclass
class SourceExamples:
    """What one source yields: its examples with their locations, and its bad rows."""

    examples: list[TokenizedExample] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)  # (file or source name, "line" | "row")
    locations: list[tuple[int, int]] = field(default_factory=list)  # (index into files, line/row)
    rows: int = 0
    bad: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)  # the first few, in row order
    cached: bool = False

    def where(self, i: int) -> str:
        f, line = self.locations[i]
        name, unit = self.files[f]
        return f"{name}:{line}" if unit == "line" else f"{name} row {line}"


def default_cache_dir() -> Path:
    """$SFTLAB_DATA_CACHE, else $SFTLAB_CACHE/data (default ~/.cache/sftlab/data)."""
    return Path(os.environ["SFTLAB_DATA_CACHE"]) if os.environ.get("SFTLAB_DATA_CACHE") else cache_root() / "data"


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
    h.update(json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True).encode())
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


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the key parts (strings, numbers, None)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load(root: Path, key: str) -> SourceExamples | None:
    """The entry for `key`, or None when absent or unreadable (then it is rebuilt)."""
    entry = root / key
    if not (entry / "meta.json").is_file():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            return None
        arr = {n: np.load(entry / f"{n}.npy", allow_pickle=False)
               for n in ("input_ids", "labels", "offsets", "lines", "files")}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable data cache entry %s: %s", entry, e)
        return None
    ids, labels, offsets = arr["input_ids"].tolist(), arr["labels"].tolist(), arr["offsets"].tolist()
    examples = [TokenizedExample(ids[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    return SourceExamples(
        examples=examples,
        files=[(name, unit) for name, unit in meta["files"]],
        locations=list(zip(arr["files"].tolist(), arr["lines"].tolist())),
        rows=meta["rows"], bad=meta["bad"], bad_reasons=Counter(meta["bad_reasons"]),
        bad_examples=meta["bad_examples"], cached=True,
    )


def save(root: Path, key: str, data: SourceExamples, key_parts: dict[str, Any]) -> None:
    """Write the entry atomically: a temporary directory renamed into place."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:8]}-", dir=root))
    try:
        lengths = [len(ex.input_ids) for ex in data.examples]
        flat_ids = [t for ex in data.examples for t in ex.input_ids]
        flat_labels = [t for ex in data.examples for t in ex.labels]
        np.save(tmp / "input_ids.npy", np.asarray(flat_ids, dtype=np.int32))
        np.save(tmp / "labels.npy", np.asarray(flat_labels, dtype=np.int32))
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))
        np.save(tmp / "lines.npy", np.asarray([line for _, line in data.locations], dtype=np.int64))
        np.save(tmp / "files.npy", np.asarray([f for f, _ in data.locations], dtype=np.int32))
        meta = {"format": CACHE_FORMAT, "key": key_parts, "rows": data.rows, "bad": data.bad,
                "bad_reasons": dict(data.bad_reasons), "bad_examples": data.bad_examples,
                "files": [list(f) for f in data.files], "ignore_index": IGNORE_INDEX}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        final = root / key
        if final.exists():  # unreadable or outdated entry: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():  # not a concurrent writer finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
