"""Open a data source and yield its raw rows, each with where it came from.

A source is one of:

- a local file: `.jsonl` (JSON lines), `.json` (an array of objects, or JSON lines), `.parquet`, `.csv`
  (every column read as a string);
- a local directory: a `datasets` `save_to_disk` directory (a `Dataset`, or a `DatasetDict`
  whose `split` is taken), else every supported file directly inside it, in sorted name order;
- a `datasets` hub name (`owner/name`, with `subset` and `split`), loaded with `datasets.load_dataset`;
  a path that looks local (a file extension such as `.jsnol`, a leading `.`, `/` or `~`, more than one
  `/`, or a first component that is a local directory) is never tried on the Hub: when it does not exist
  it fails at once, with the closest file name in its directory as a suggestion (data/locate.py);
- through the Python API, a `datasets.Dataset` object, bare or wrapped in `DatasetSource` to give it
  a name, a format or a mixing weight.

Rows are streamed: JSONL line by line (`iter_jsonl`, also used for eval and vision files), Parquet and
CSV in record batches, `datasets` objects in batches of their Arrow table; only a `.json` array is parsed
whole (use JSON lines for big data).
Rows are located by file and line (JSONL: `file:3`, the line number) or by row number (every other
kind: `file row 3`, the 3rd row of the array, table or dataset), both 1-based, so a bad row can be
named precisely. `Source.fingerprint()` identifies the content for the cache: a
sha256 of the files' bytes, or the dataset fingerprint for hub and in-memory datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from sftlab.compat import datasets as datasets_compat
from sftlab.config.schema import SourceConfig
from sftlab.data.locate import looks_local, not_found
from sftlab.data.markers import TextMarkers
from sftlab.data.records import ColumnMap
from sftlab.data.types import BadRecord, DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
log = logging.getLogger(__name__)
BATCH = 1024


@dataclass
class DatasetSource:
    """A `datasets.Dataset` passed through the Python API, with the options a SourceConfig has."""

    dataset: datasets.Dataset
    name: str | None = None
    format: str = "auto"
    weight: float | int | None = None
    columns: dict[str, str] = field(default_factory=dict)  # as SourceConfig.columns
    roles: dict[str, str] = field(default_factory=dict)  # as SourceConfig.roles
    response_template: str | None = None  # as SourceConfig.response_template
    instruction_template: str | None = None  # as SourceConfig.instruction_template


SourceSpec = Union[SourceConfig, DatasetSource, datasets.Dataset]


@dataclass
class RawRow:
    """One row as read, or the BadRecord that reading it produced; `unit` is "line" or "row" (both 1-based)."""

    source: str
    line: int
    unit: str
    row: Any


@dataclass
class Source:
    """An opened source: its display name, options, and either its files or a loaded Dataset."""

    name: str
    kind: str  # "files" | "disk" | "hub" | "dataset"
    format: str = "auto"
    weight: float | int | None = None
    files: list[Path] = field(default_factory=list)
    dataset: datasets.Dataset | None = None
    columns: ColumnMap = field(default_factory=ColumnMap)  # its `columns` / `roles` renaming
    formatting_func: Any = None  # the Python API's formatting function, applied to every row
    markers: TextMarkers | None = None  # response/instruction templates for text rows (markers.py)

    def fingerprint(self) -> str:
        """A content hash: the files' bytes (and paths) or the dataset's fingerprint."""
        h = hashlib.sha256(f"{self.kind}\0{self.name}\0".encode())
        if self.kind == "hub" or self.kind == "dataset":
            h.update(str(datasets_compat.fingerprint(self.dataset)).encode())
        for path in self._content_files():
            h.update(f"{path.resolve()}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def _content_files(self) -> list[Path]:
        if self.kind == "files":
            return self.files
        if self.kind == "disk":
            root = Path(self.name)
            return sorted(p for p in root.rglob("*") if p.is_file())
        return []

    def rows(self) -> Iterator[RawRow]:
        """Every row in order; unreadable rows come as RawRow(row=BadRecord)."""
        if self.dataset is not None:
            yield from _dataset_rows(self.dataset, self.name)
            return
        for path in self.files:
            yield from _file_rows(path)


def _dataset_rows(ds: datasets.Dataset, name: str) -> Iterator[RawRow]:
    index = 1  # rows are cited 1-based, as JSONL lines are
    for batch in ds.iter(batch_size=BATCH):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys)):
            yield RawRow(name, index, "row", dict(zip(keys, values)))
            index += 1


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    """A Parquet or CSV file's record batches, streamed (CSV columns all read as strings)."""
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH)
        return
    with pa_csv.open_csv(path) as probe:  # the column names, to read every column as a string
        names = probe.schema.names
    convert = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names})
    yield from pa_csv.open_csv(path, convert_options=convert)


def _table_rows(path: Path) -> Iterator[RawRow]:
    name, index = str(path), 1  # 1-based
    batches = _batches(path)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as e:
            where = f" (after row {index - 1})" if index > 1 else ""
            raise DataError(
                f"data source {path}: cannot read it as {path.suffix[1:].upper()}{where}: {e}"
            ) from None
        for row in batch.to_pylist():
            yield RawRow(name, index, "row", row)
            index += 1


def _file_rows(path: Path) -> Iterator[RawRow]:
    name = str(path)
    if path.suffix in (".parquet", ".csv"):
        yield from _table_rows(path)
        return
    if path.suffix == ".json" and _starts_with(path, b"["):
        try:
            rows = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataError(f"data source {path}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"data source {path}: invalid JSON array: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
        for i, row in enumerate(rows, start=1):
            yield RawRow(name, i, "row", row)
        return
    if path.suffix == ".json" and _starts_with(path, b"{"):
        _refuse_one_object(path)
    for lineno, row in iter_jsonl(path):  # .jsonl, and .json files holding JSON lines
        yield RawRow(name, lineno, "line", row)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; bad lines are yielded as BadRecord."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a BOM
            except UnicodeDecodeError as e:
                yield (
                    lineno,
                    BadRecord(str(path), lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"),
                )
                continue
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                yield lineno, BadRecord(str(path), lineno, None, f"invalid JSON: {e.msg} (column {e.colno})")


def _refuse_one_object(path: Path) -> None:
    """A .json file that is one (pretty-printed) JSON object, e.g. LLaMA-Factory's dataset_info.json given
    by mistake, is one error, not a parse error per line. JSON lines (an object per line) pass."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        json.loads(first.decode("utf-8-sig"))
        return  # the first line is a whole object: JSON lines
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    try:
        whole = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return  # neither: the per-line errors say where
    if isinstance(whole, dict):
        keys = ", ".join(list(map(str, whole))[:5]) + (", ..." if len(whole) > 5 else "")
        raise DataError(
            f"data source {path}: a JSON object (keys: {keys}), not an array of rows or JSON lines; "
            "a data file holds a JSON array of row objects or one row object per line"
        )


def _starts_with(path: Path, prefix: bytes) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"\xef\xbb\xbf" + prefix) or head.startswith(prefix)


def _load_from_disk(path: Path, split: str) -> datasets.Dataset:
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(
            f"data source {path}: cannot load the saved dataset: {type(e).__name__}: {e}"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data source {path}: no split {split!r} (has {', '.join(ds)}); set its `split`")
        ds = ds[split]
    return ds


@contextlib.contextmanager
def _quiet_hub_retries():
    """huggingface_hub logs each retry of a failed request (twice under a root handler); the failure
    itself becomes one DataError, so those warnings are muted while a hub dataset loads."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def _load_hub(spec: SourceConfig) -> datasets.Dataset:
    log.info("data source %r is not a local path: loading it from the Hugging Face Hub", spec.path)
    try:
        with _quiet_hub_retries():
            ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split)
    except Exception as e:
        offline = any(
            os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
            for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        )
        hint = (
            " Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): only datasets already in the "
            "local `datasets` cache can be loaded."
            if offline
            else ""
        )
        raise DataError(
            f"data source {spec.path!r}: not a local file or directory, and loading it as a hub "
            f"dataset (subset={spec.subset!r}, split={spec.split!r}) failed: "
            f"{type(e).__name__}: {e}.{hint}"
        ) from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(
            f"data source {spec.path!r}: split {spec.split!r} is not a single dataset ({type(ds).__name__})"
        )
    return ds


def open_source(spec: SourceSpec, index: int = 0) -> Source:
    """Resolve a source spec to an opened Source, or raise DataError naming it."""
    if isinstance(spec, datasets.Dataset):
        spec = DatasetSource(spec)
    source = _open_spec(spec, index)
    source.columns = ColumnMap(dict(spec.columns), dict(spec.roles))
    return source


def _open_spec(spec: SourceConfig | DatasetSource, index: int) -> Source:
    if isinstance(spec, DatasetSource):
        if not isinstance(spec.dataset, datasets.Dataset):
            raise DataError(
                f"DatasetSource {spec.name or index}: expected a datasets.Dataset, "
                f"got {type(spec.dataset).__name__}"
            )
        name = spec.name or f"<Dataset {index} {datasets_compat.fingerprint(spec.dataset)}>"
        return Source(name, "dataset", spec.format, spec.weight, dataset=spec.dataset)
    path = Path(spec.path).expanduser()
    if path.is_file():
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"data source {path}: unsupported file type (expected {', '.join(SUPPORTED_SUFFIXES)})"
            )
        return Source(str(path), "files", spec.format, spec.weight, files=[path])
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return Source(
                str(path), "disk", spec.format, spec.weight, dataset=_load_from_disk(path, spec.split)
            )
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in SUPPORTED_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"data source {path}: directory has no {', '.join(SUPPORTED_SUFFIXES)} files "
                "and is not a `save_to_disk` dataset"
            )
        return Source(str(path), "files", spec.format, spec.weight, files=files)
    if looks_local(spec.path):
        raise not_found(path)
    name = spec.path + (f" subset={spec.subset}" if spec.subset else "") + f" split={spec.split}"
    return Source(name, "hub", spec.format, spec.weight, dataset=_load_hub(spec))
