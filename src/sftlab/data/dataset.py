"""Sources become the train and eval sets.

`build_datasets(cfg, tokenizer, seed)` is the entry point. Every source (sources.py) becomes flat token
arrays on disk (`prepare_source`): the cache entry (store.py) when its key matches, else read by
`read_source` and then cached (or read into a temporary directory when the cache is off). The rows are
streamed in chunks of `ROWS_PER_CHUNK`; each chunk is encoded (`encode_chunk`: normalised, rendered,
tokenized and labelled by tokenize.py, or for a vision-language model by vision.py), here or in
`data.num_proc` worker processes, and appended to flat arrays (store.py). Peak memory does not grow
with the data set: only a few chunks are in flight, and the chunking is fixed, so the arrays are the
same for any number of workers. For a ChatML-family template the direct renderer (fast_chatml.py) is
used where it is checked identical; a sampled conversation that disagrees makes the source read again
from the start through the template.

Then, on index arrays (`Examples`; the tokens stay memory-mapped), each source's length policy
(`apply_length_policy`: `data.on_overlength`), the mix by weight and the eval split. Weights (per source,
applied to its usable examples):

- None: the whole source, once;
- a float <= 1.0: that fraction of it, sampled without replacement (at least one example);
- an integer > 1 (or an integral float such as 3.0): exactly that many examples, the whole source
  repeated as often as it fits and the rest sampled without replacement.

A selection is an int64 array of example indices per source (repeats allowed). Every source draws from
its own generator seeded by (seed, source position), so adding a source does not change the others; a
million examples cost a few megabytes here. Eval is the eval sources, else a seeded `eval_fraction` of
the training mix held out (`hold_out`), never shared with training.

Every decision is counted in `DataReport` (report.py), per source (with the format each row was read as,
the fields no reader used, the `columns` / `roles` entries no row used, the target-token share and the
lengths), and all validation happens here, before training starts. Bad rows are counted and skipped (or,
with `on_bad_record: error`, the first one is the error); `data.max_bad_fraction` holds for each source
on its own; a source (train source or eval set) left with no example is an error naming it. Rows with
images (content parts, or LLaMA-Factory's images/videos/audios columns) on a text-only model are not
rows to skip: once the source is read they are one `DataError` naming the source, the first few rows and
their count (`image_rows_error`). Rows whose tools the chat template does not render stop the run, or
with `data.tools: drop` are trained without them under one warning counting them (rendering.py).

For a vision-language model (`processor`) the rows are read with their images (vision.py) and each
example's image references are stored beside its tokens; over-length image rows are bad rows (never
truncated), so `max_seq_length` joins the cache key; the report counts each source's images and image
tokens.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import pickle
import random
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data import store
from sftlab.data.fast_chatml import FastPathMismatch
from sftlab.data.markers import markers_for
from sftlab.data.records import Conversation
from sftlab.data.report import DataReport, SourceStats, count_targets, length_stats
from sftlab.data.sources import DatasetSource, Source, SourceSpec, open_source
from sftlab.data.store import (
    TOKEN_ARRAYS,
    ArrayWriter,
    Examples,
    SourceData,
    TokenArrays,
    id_dtype,
    write_chunk_files,
)
from sftlab.data.templates import load_template
from sftlab.data.tokenize import ChunkContext, RawChunk, compact_example, detect_chatml, encode_text_rows
from sftlab.data.types import IGNORE_INDEX, BadRecord, DataError, ImageRow
from sftlab.data.vision import encode_vision_rows, image_token_ids, processor_fingerprint

__all__ = [
    "DataError",
    "DataReport",
    "DatasetSource",
    "SourceStats",
    "build_datasets",
    "check_sendable",
    "count_targets",
    "length_stats",
    "load_template",
]

log = logging.getLogger(__name__)
MAX_CITED = 5  # rows named in a source-level error
ROWS_PER_CHUNK = 512  # rows per unit of work (fixed: the arrays' chunk checksums do not depend on num_proc)
FAST_RENDER_NOTE = "rendered by the direct ChatML renderer (checked against the template on a sample)"
FROM_CONFIG = object()  # build_datasets resolves the template from the config
Selection = list[np.ndarray]  # per source, indices of its examples (with repeats)


# --- one chunk of rows encoded, here or in a worker process ------------------------------------------


@dataclass
class ChunkResult:
    rows: int
    tokens: dict[str, Any]  # "ids", "targets": arrays, or (path, bytes, sha256) written by a worker
    lengths: np.ndarray
    lines: np.ndarray
    files: np.ndarray
    fix_pos: np.ndarray  # chunk-local token positions of labels that are neither -100 nor the id
    fix_val: np.ndarray
    bad: list[BadRecord] = field(default_factory=list)
    conversations: int = 0  # chat rows among them (rendered by a template or the direct renderer)
    formats: Counter = field(
        default_factory=Counter
    )  # format -> rows read as it (bad rows after reading included)
    unknown: Counter = field(default_factory=Counter)  # unknown field -> rows holding it
    tools_dropped: int = (
        0  # rows whose tools / tool calls the template does not render, dropped (data.tools: drop)
    )
    mapped: Counter = field(
        default_factory=Counter
    )  # `columns.<name>` / `roles.<name>` entry -> rows using it
    images: list[list[str]] | None = None  # per example its image references (vision-language sources)


def encode_chunk(rows: RawChunk, ctx: ChunkContext, number: int = 0) -> ChunkResult:
    """Normalise, tokenize and label chunk `number` of a source into flat arrays; bad rows listed in
    order. The direct renderer (if any) is checked on every conversation of chunk 0 and on a sample after.
    With a processor (a vision-language model) the rows are read with their images (vision.py)."""
    mapped: Counter = Counter()
    if ctx.columns and ctx.formatting_func is None:
        for _, _, _, row in rows:
            if isinstance(row, dict):
                mapped.update(ctx.columns.used(row))
    images = None
    if ctx.processor is not None:
        vision_done, bad, records = encode_vision_rows(rows, ctx)
        done = [(k, f, line, compact_example(res, ctx.ids_dtype)) for k, f, line, res in vision_done]
        images, dropped = [list(res.images) for *_, res in vision_done], 0
        del vision_done
    else:
        done, bad, records, dropped = encode_text_rows(rows, ctx, number)
    ids, targets, lengths, lines, files, fix_pos, fix_val = [], [], [], [], [], [], []
    base = 0
    for _, f, line, (i, t, fp, fv) in done:
        ids.append(i)
        targets.append(t)
        fix_pos.append(fp + base)
        fix_val.append(fv)
        lengths.append(len(i))
        lines.append(line)
        files.append(f)
        base += len(i)
    cat = lambda parts, dtype: (
        np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
    )
    return ChunkResult(
        len(rows),
        {"ids": cat(ids, ctx.ids_dtype), "targets": cat(targets, np.uint8)},
        np.asarray(lengths, np.int64),
        np.asarray(lines, np.int64),
        np.asarray(files, np.int32),
        cat(fix_pos, np.int64),
        cat(fix_val, np.int32),
        [e for _, e in sorted(bad, key=lambda x: x[0])],
        sum(isinstance(r, Conversation) for r in records),
        Counter(r.format for r in records),
        Counter(k for r in records for k in r.unknown),
        dropped,
        mapped,
        images,
    )


_WORKER: dict[str, Any] = {}


def init_worker(ctx: ChunkContext, directory: str) -> None:
    _WORKER.update(ctx=ctx, directory=Path(directory))


def worker_chunk(number: int, rows: RawChunk, files: list[str]) -> ChunkResult:
    """`encode_chunk` in a worker process; the token arrays go to files, not back through the pipe."""
    ctx: ChunkContext = _WORKER["ctx"]
    ctx.files = files
    result = encode_chunk(rows, ctx, number)
    result.tokens = write_chunk_files(_WORKER["directory"], f".chunk-{number:08d}", result.tokens)
    return result


# --- one source read into token arrays, through the cache --------------------------------------------


def _raw_chunks(source: Source, data: SourceData, rows_per_chunk: int) -> Iterator[RawChunk]:
    """The source's rows in chunks, each row tagged with its file's index in `data.files`."""
    file_index: dict[str, int] = {}
    chunk: RawChunk = []
    for raw in source.rows():
        if raw.source not in file_index:
            file_index[raw.source] = len(data.files)
            data.files.append((raw.source, raw.unit))
        chunk.append((file_index[raw.source], raw.line, raw.unit, raw.row))
        if len(chunk) == rows_per_chunk:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encoded_chunks(
    chunks: Iterator[RawChunk], ctx: ChunkContext, data: SourceData, num_proc: int, directory: Path
) -> Iterator[ChunkResult]:
    """Encoded chunks in order: here, or in `num_proc` worker processes with at most 2 chunks each in flight."""
    names = lambda: [name for name, _ in data.files]
    if num_proc <= 1:
        for number, chunk in enumerate(chunks):
            ctx.files = names()
            yield encode_chunk(chunk, ctx, number)
        return
    # fork where available: no re-import of the caller's __main__ and no start-up cost; the workers
    # only render templates and run the tokenizer (tokenizers turns its own threads off after a fork)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    check_sendable(ctx, num_proc, method)
    os.environ.setdefault(
        "TOKENIZERS_PARALLELISM", "false"
    )  # workers, not tokenizer threads, share the cores
    # the objects alive now (the imported libraries, the tokenizer) go to the collector's permanent
    # generation: its passes in the forked workers (and here) no longer write to their pages, which
    # would otherwise turn every page they share into a private copy per process
    freeze = gc.get_freeze_count() == 0  # a caller's own frozen objects stay frozen
    if freeze:
        gc.freeze()
    try:
        with ProcessPoolExecutor(
            num_proc,
            mp_context=multiprocessing.get_context(method),
            initializer=init_worker,
            initargs=(ctx, str(directory)),
        ) as pool:
            pending: deque = deque()
            for number, chunk in enumerate(chunks):
                pending.append(pool.submit(worker_chunk, number, chunk, names()))
                if len(pending) >= 2 * num_proc:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
    finally:
        if freeze:
            gc.unfreeze()


def check_sendable(ctx: ChunkContext, num_proc: int, method: str) -> None:
    """Workers started by `spawn` get the formatting function pickled: one that cannot be (a lambda, a
    local function) fails here, before any row is read, with the fix named."""
    if ctx.formatting_func is None or method == "fork":
        return
    try:
        pickle.dumps(ctx.formatting_func)
    except Exception as e:  # noqa: BLE001 - pickling errors vary by object
        raise DataError(
            f"data source {ctx.source}: formatting_func cannot be sent to the data.num_proc={num_proc} "
            f"worker processes ({type(e).__name__}: {e}); define it at module level, or set "
            "data.num_proc=1"
        ) from None


def formatting_fingerprint(func: Any) -> str | None:
    """The formatting function's part of the cache key: a hash of its code and the values it closes
    over (`datasets`' own function hasher); None without one."""
    if func is None:
        return None
    from datasets.fingerprint import Hasher

    return Hasher.hash(func)


def _note_bad(data: SourceData, err: BadRecord, strict: bool) -> None:
    if strict:
        raise DataError(str(err))
    data.bad += 1
    data.bad_reasons[err.reason] += 1
    if len(data.bad_examples) < store.MAX_BAD_EXAMPLES:
        data.bad_examples.append(str(err))


def _places(errs: list[BadRecord]) -> str:
    """`a.jsonl lines 3, 9; b.parquet rows 2` (in order, grouped by file)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for e in errs:
        groups.setdefault((e.source, e.unit), []).append(str(e.line))
    return "; ".join(
        f"{src} {unit}{'s' if len(n) > 1 else ''} {', '.join(n)}" for (src, unit), n in groups.items()
    )


def image_rows_error(source: str, first: list[BadRecord], count: int, rows: int) -> DataError:
    """One error for a source's rows with images (content parts, or an images/videos/audios column), naming
    the first few and the count."""
    more = f" and {count - len(first)} more" if count > len(first) else ""
    return DataError(
        f"data source {source}: {count} of {rows} rows have images ({_places(first)}{more}; "
        f"the first: field '{first[0].field_name}'). Images need a vision-language model, and this run "
        "trains a text-only model (no vision_config): train a vision-language model (docs/vision.md), "
        "or drop the image parts, or those rows"
    )


def read_source(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str | None,
    directory: Path,
    processor: Any = None,
) -> SourceData:
    """Read, normalise, tokenize and label one source into flat arrays in `directory`, chunk by chunk.

    Memory stays bounded: a few chunks are in flight at a time. Raises on the first bad row when strict.
    For a ChatML-family template the direct renderer is used where it is checked identical; if a
    sampled conversation disagrees, the source is read again from the start through the template.
    """
    ctx = ChunkContext(
        tokenizer, source.name, [], source.format, cfg.loss_on, template, id_dtype(len(tokenizer))
    )
    ctx.columns, ctx.formatting_func, ctx.markers = source.columns, source.formatting_func, source.markers
    ctx.tools = cfg.tools
    ctx.add_bos = cfg.add_bos
    if processor is not None:  # rows with images: tokenized by data/vision.py, never by the direct renderer
        ctx.processor, ctx.max_seq_length, ctx.image_dir = processor, cfg.max_seq_length, str(directory)
        return _read_chunks(source, ctx, cfg, directory)
    ctx.fast = detect_chatml(template or tokenizer.chat_template, dict(tokenizer.special_tokens_map))
    if ctx.fast is not None:
        try:
            data = _read_chunks(source, ctx, cfg, directory)
            if data.conversations:
                data.notes.append(FAST_RENDER_NOTE)
            return data
        except FastPathMismatch as e:
            log.warning("data source %s: %s; preparing it again through the chat template", source.name, e)
            ctx.fast = None
    return _read_chunks(source, ctx, cfg, directory)


def _read_chunks(source: Source, ctx: ChunkContext, cfg: DataConfig, directory: Path) -> SourceData:
    strict = cfg.on_bad_record == "error"
    data = SourceData()
    writer = ArrayWriter(directory, ctx.ids_dtype, images=ctx.processor is not None)
    images: list[BadRecord] = []  # the first rows with image parts
    n_images = 0
    try:
        for res in _encoded_chunks(
            _raw_chunks(source, data, ROWS_PER_CHUNK), ctx, data, cfg.num_proc, directory
        ):
            data.rows += res.rows
            data.conversations += res.conversations
            data.formats.update(res.formats)
            data.unknown.update(res.unknown)
            data.tools_dropped += res.tools_dropped
            data.mapped.update(res.mapped)
            for err in res.bad:
                if isinstance(err, ImageRow):  # not a row to skip: the run cannot train on images at all
                    n_images += 1
                    images += [err][: MAX_CITED - len(images)]
                    continue
                _note_bad(data, err, strict)
            for name in TOKEN_ARRAYS:
                part = res.tokens[name]
                writer.append_file(name, *part) if isinstance(part, tuple) else writer.append(name, part)
            writer.add_examples(res.lengths, res.lines, res.files, res.fix_pos, res.fix_val)
            if res.images is not None:
                writer.add_images(res.images)
        if n_images:
            raise image_rows_error(source.name, images, n_images, data.rows)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    data.arrays = TokenArrays(directory, verify=False)
    return data


def _read_uncached(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str | None,
    processor: Any = None,
) -> SourceData:
    """Build the arrays in a temporary directory that is removed at once: the open memory maps keep
    the files readable until the run ends (POSIX), and nothing is left behind. Images a Dataset held
    in memory are read from there in every batch: then the directory goes when the process ends."""
    tmp = Path(tempfile.mkdtemp(prefix="sftlab-data-"))
    keep = False
    try:
        data = read_source(source, tokenizer, cfg, template, tmp, processor)
        keep = (tmp / "images").is_dir()
        return data
    finally:
        if keep:
            atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_source(
    source: Source,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str | None,
    processor: Any = None,
) -> SourceData:
    """The source's examples, from the cache when its key matches (and its checksums hold, and for a
    vision-language model its image files are unchanged), else built (and then cached). `processor`:
    a vision-language model's (its settings and max_seq_length join the key)."""
    if not cfg.cache:
        return _read_uncached(source, tokenizer, cfg, template, processor)
    parts = {
        "source": source.fingerprint(),
        "tokenizer": store.tokenizer_fingerprint(tokenizer),
        "template": template or tokenizer.chat_template,
        "format": source.format,
        "loss_on": cfg.loss_on,
        "tools": cfg.tools,
        "columns": source.columns.columns,
        "roles": source.columns.roles,
        "code": store.code_fingerprint(),
        **(
            {"formatting_func": formatting_fingerprint(source.formatting_func)}
            if source.formatting_func
            else {}
        ),
        **({"text_markers": source.markers.key()} if source.markers else {}),
        **({"add_bos": True} if cfg.add_bos else {}),
        **(
            {"processor": processor_fingerprint(processor), "max_seq_length": cfg.max_seq_length}
            if processor is not None
            else {}
        ),
    }
    key = store.cache_key(parts)
    root = store.cache_dir(cfg.cache_dir)
    data = store.load(root, key)
    if data is not None:
        if cfg.on_bad_record == "error" and data.bad:
            raise DataError(data.bad_examples[0])
        return data
    tmp = None
    try:
        tmp = store.new_entry_dir(root, key)
        data = read_source(source, tokenizer, cfg, template, tmp, processor)
        readable = {**parts, "name": source.name, "template": store.cache_key({"t": parts["template"]})}
        data.arrays = TokenArrays(store.commit(tmp, root, key, data, readable), verify=False)
        return data
    except OSError as e:  # an unwritable cache costs the next run time, never this run
        log.warning("could not write the data cache entry for %s in %s: %s", source.name, root, e)
        return _read_uncached(source, tokenizer, cfg, template, processor)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- mixing the sources by weight, and the held-out eval split ---------------------------------------


def check_weight(weight: float | int | None, name: str) -> None:
    """Reject weights that are neither a fraction <= 1.0 nor a whole count."""
    if weight is None:
        return
    if weight <= 0:
        raise DataError(f"data source {name}: weight must be > 0, got {weight}")
    if weight > 1 and float(weight) != int(weight):
        raise DataError(
            f"data source {name}: weight {weight} is neither a fraction <= 1.0 nor a whole number of examples"
        )


def select(n: int, weight: float | int | None, rng: random.Random) -> np.ndarray:
    """Indices of the examples a source contributes (see the module docstring for the rules)."""
    if weight is None or n == 0 or weight == 1:
        return np.arange(n, dtype=np.int64)
    if weight < 1:
        return np.sort(np.asarray(rng.sample(range(n), max(1, round(n * weight))), dtype=np.int64))
    count = int(weight)
    full, rest = divmod(count, n)
    return np.concatenate(
        [
            np.tile(np.arange(n, dtype=np.int64), full),
            np.sort(np.asarray(rng.sample(range(n), rest), dtype=np.int64)),
        ]
    )


def mix(sizes: list[int], weights: list[float | int | None], seed: int) -> Selection:
    """Per-source selections for sources of `sizes` examples with `weights`."""
    return [select(n, w, random.Random(f"mix:{seed}:{i}")) for i, (n, w) in enumerate(zip(sizes, weights))]


def hold_out(selection: Selection, fraction: float, seed: int) -> tuple[Selection, Selection]:
    """Split a selection into (train, eval): `fraction` of its distinct examples go to eval.

    Held-out examples leave the training side with all their repeats, so the two never share an
    example. Eval takes each held-out example once, in index order; at least one when `fraction` > 0.
    The distinct examples are ordered by (source, index) and sampled by position.
    """
    distinct = [np.unique(picks) for picks in selection]
    total = sum(len(d) for d in distinct)
    if fraction <= 0 or not total:
        return selection, [np.zeros(0, dtype=np.int64) for _ in selection]
    rng = random.Random(f"eval:{seed}")
    held_pos = np.zeros(total, dtype=bool)
    held_pos[rng.sample(range(total), max(1, round(total * fraction)))] = True
    train, evals, base = [], [], 0
    for picks, d in zip(selection, distinct):
        is_held = np.zeros(int(d[-1]) + 1 if len(d) else 0, dtype=bool)
        is_held[d] = held_pos[base : base + len(d)]
        base += len(d)
        train.append(picks[~is_held[picks]] if len(picks) else picks)
        evals.append(d[is_held[d]] if len(d) else d)
    return train, evals


# --- the length policy, the checks, and the train and eval sets --------------------------------------


def apply_length_policy(
    data: SourceData, cfg: DataConfig, report: DataReport, stats: SourceStats
) -> Examples:
    """The source's usable examples: those longer than max_seq_length kept, dropped, truncated or
    refused; what was done is counted in the source's `stats` (the report sums them). A group is over
    when one of its sequences is; it is kept or dropped whole, each sequence truncated on its own."""
    examples = Examples.whole(data.arrays) if data.arrays is not None else Examples.empty()
    max_seq_length = cfg.max_seq_length
    over = np.flatnonzero(examples.longest > max_seq_length)
    if not len(over):
        return examples
    if cfg.on_overlength == "error":
        i = int(over[0])
        raise DataError(
            f"{data.where(i)}: {int(examples.longest[i])} tokens exceed data.max_seq_length={max_seq_length} "
            "(set data.on_overlength to drop or truncate)"
        )
    keep = np.ones(len(examples), dtype=bool)
    keep[over] = False
    if cfg.on_overlength == "drop":
        stats.dropped += len(over)
        return examples.select(np.flatnonzero(keep))
    arrays = data.arrays
    for i in over:
        cut = examples.starts_over(int(i), max_seq_length)
        if any(arrays.count_targets(start, start + max_seq_length) == 0 for start in cut):
            stats.no_target += 1
            continue
        keep[i] = True
        stats.truncated += 1
        if any(
            np.all(arrays.tokens(start + max_seq_length - 1, start + max_seq_length + 1)[1] != IGNORE_INDEX)
            for start in cut
        ):
            report.truncated_inside_turn += (
                1  # the labelled run (a turn and its end-of-turn token) continues past the cut
            )
    examples.truncate(max_seq_length)
    return examples.select(np.flatnonzero(keep))


def _name_of(spec: SourceSpec) -> str | None:
    return getattr(spec, "name", None)


def named_positions(names: Sequence[str | None], sizes: Sequence[int]) -> dict[str, np.ndarray]:
    """name -> positions in the concatenation of parts of `sizes` (unnamed parts in none)."""
    out: dict[str, list[np.ndarray]] = {}
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    for name, start, n in zip(names, starts, sizes):
        if name:
            out.setdefault(name, []).append(np.arange(start, start + n, dtype=np.int64))
    return {name: np.concatenate(parts) for name, parts in out.items()}


def _weight_of(spec: SourceSpec) -> tuple[float | int | None, str]:
    if isinstance(spec, SourceConfig):
        return spec.weight, spec.path
    if isinstance(spec, DatasetSource):
        return spec.weight, spec.name or "<Dataset>"
    return None, "<Dataset>"


def count_images(data: SourceData, examples: Examples, stats: SourceStats, processor: Any) -> None:
    """A vision-language source's images and image tokens (of its usable examples)."""
    store = data.arrays
    if processor is None or store is None or store.images is None:
        return
    stats.images = sum(len(examples.images(i)) for i in range(len(examples)))
    special = np.fromiter(image_token_ids(processor), dtype=np.int64)
    stats.image_tokens = sum(
        int(np.isin(store.ids[int(a) : int(a) + int(n)], special).sum())
        for a, n in zip(examples.start, examples.length)
    )


def _source_label(split: str, source_name: str, name: str | None) -> str:
    """How errors name a source: `train source a.jsonl`, `eval set 'chat' (chat.jsonl)`."""
    kind = "eval set" if split == "eval" and name else f"{split} source"
    if not name:
        return f"{kind} {source_name}"
    return f"{kind} {name!r}" if name == source_name else f"{kind} {name!r} ({source_name})"


def _check_bad_rows(label: str, data: SourceData, cfg: DataConfig) -> None:
    """data.max_bad_fraction holds for each source: a bad source is not hidden by good ones."""
    if data.rows and data.bad / data.rows > cfg.max_bad_fraction:
        raise DataError(
            f"{label}: {data.bad} of {data.rows} rows are bad (> data.max_bad_fraction="
            f"{cfg.max_bad_fraction}, which applies to each source); first problems:\n  "
            + "\n  ".join(data.bad_examples[:5])
        )


def _check_not_empty(
    label: str, data: SourceData, examples: Examples, stats: SourceStats, cfg: DataConfig
) -> None:
    """A source left with no example (its eval loss would be nan, its weight nothing) stops the run."""
    if len(examples):
        return
    if not data.rows:
        why = "the source has no rows"
    elif not len(data):
        why = f"all {data.rows} rows are bad; first problems:\n  " + "\n  ".join(data.bad_examples[:5])
    else:
        why = (
            f"its {len(data)} examples are longer than data.max_seq_length={cfg.max_seq_length} "
            f"(data.on_overlength={cfg.on_overlength}"
            + (f"; {stats.no_target} left without target tokens when truncated)" if stats.no_target else ")")
        )
    raise DataError(f"{label}: no examples left: {why}")


def _prepare_split(
    specs: Sequence[SourceSpec],
    split: str,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str | None,
    report: DataReport,
    formatting_func: Any = None,
    processor: Any = None,
) -> list[Examples]:
    """Usable examples per source (after the length policy); stats land in `report.sources`."""
    for spec in specs:
        check_weight(*_weight_of(spec))
    out = []
    for i, spec in enumerate(specs):
        source = open_source(spec, i)
        source.formatting_func, source.markers = formatting_func, markers_for(spec, cfg)
        data = prepare_source(source, tokenizer, cfg, template, processor)
        label = _source_label(split, source.name, _name_of(spec))
        _check_bad_rows(label, data, cfg)
        stats = SourceStats(
            f"{split}[{i}] {source.name}",
            split,
            source.weight,
            rows=data.rows,
            bad=data.bad,
            examples=len(data),
            cached=data.cached,
            fast_render=FAST_RENDER_NOTE in data.notes,
            formats=dict(data.formats),
            unknown_fields=dict(data.unknown),
            unused_mapping=[] if formatting_func else source.columns.unused(data.mapped),
        )
        if source.markers is not None and data.rows and not data.formats.get("text"):
            stats.markers_unused = source.markers.response
        report.sources.append(stats)
        report.bad_reasons.update(data.bad_reasons)
        report.tools_dropped += data.tools_dropped
        report.bad_examples.extend(data.bad_examples[: max(0, 5 - len(report.bad_examples))])
        examples = apply_length_policy(data, cfg, report, stats)
        _check_not_empty(label, data, examples, stats, cfg)
        stats.tokens, stats.targets = examples.num_tokens, count_targets(data, examples)
        stats.lengths = length_stats(examples.lengths)
        count_images(data, examples, stats, processor)
        report.source_data.append(data)
        report.source_examples.append(examples)
        out.append(examples)
    return out


def _mix_and_hold_out(
    cfg: DataConfig,
    seed: int,
    train_parts: list[Examples],
    eval_parts: list[Examples],
    eval_specs: Sequence[SourceSpec],
    report: DataReport,
) -> tuple[Examples, Examples]:
    """The sources mixed by weight into the train and eval sets (eval: the eval sources, else a seeded
    eval_fraction held out of the training mix); each source's used/held-out counts and the named eval
    sets' positions go into `report`."""
    train_stats, eval_stats = report.sources[: len(train_parts)], report.sources[len(train_parts) :]
    train_sel = mix([len(p) for p in train_parts], [s.weight for s in train_stats], seed)
    eval_sel = mix([len(p) for p in eval_parts], [s.weight for s in eval_stats], seed)
    held = [np.zeros(0, dtype=np.int64) for _ in train_parts]
    if not eval_parts and cfg.eval_fraction > 0:
        train_sel, held = hold_out(train_sel, cfg.eval_fraction, seed)
    train = Examples.concat([part.select(picks) for part, picks in zip(train_parts, train_sel)])
    evals = Examples.concat(
        [part.select(picks) for part, picks in zip(eval_parts, eval_sel)]
        + [part.select(picks) for part, picks in zip(train_parts, held)]
    )
    for stats, picks, h in zip(train_stats, train_sel, held):
        stats.used, stats.held_out = len(picks), len(h)
    for stats, picks in zip(eval_stats, eval_sel):
        stats.used = len(picks)
    report.eval_sets = named_positions([_name_of(spec) for spec in eval_specs], [len(p) for p in eval_sel])
    return train, evals


def build_datasets(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    train_sources: Sequence[SourceSpec] | None = None,
    eval_sources: Sequence[SourceSpec] | None = None,
    template: str | None | object = FROM_CONFIG,
    formatting_func: Any = None,
    processor: Any = None,
) -> tuple[Examples, Examples, DataReport]:
    """Return (train, eval, report); train and eval are `Examples` over memory-mapped token arrays.

    `train_sources` / `eval_sources` add sources after the configured `cfg.train` / `cfg.eval`:
    SourceConfig objects, `datasets.Dataset` objects, or `DatasetSource(dataset, name, format, weight)`.
    Eval comes from the eval sources, else a seeded `eval_fraction` of the mixed training examples;
    `report.eval_sets` gives the positions in eval of each NAMED eval source (SourceConfig.name,
    DatasetSource.name), sources of the same name together.
    `formatting_func` (the Python API's) turns every row into messages, {prompt, completion} or text.
    `template`: the chat template text when the caller resolved it already (`load_template`).
    `processor`: a vision-language model's; rows are then read with their images (data/vision.py).
    """
    report = DataReport()
    if template is FROM_CONFIG:
        template = load_template(cfg, tokenizer)
    train_specs = [*cfg.train, *(train_sources or [])]
    eval_specs = [*cfg.eval, *(eval_sources or [])]
    train_parts = _prepare_split(
        train_specs, "train", tokenizer, cfg, template, report, formatting_func, processor
    )
    eval_parts = _prepare_split(
        eval_specs, "eval", tokenizer, cfg, template, report, formatting_func, processor
    )
    if report.tools_dropped:
        log.warning(
            "%d rows carry tools, tool calls or tool results that the chat template does not render: "
            "trained without them (data.tools: drop; a tool template such as data.chat_template: "
            "chatml_tools keeps them)",
            report.tools_dropped,
        )
    train, evals = _mix_and_hold_out(cfg, seed, train_parts, eval_parts, eval_specs, report)
    report.kept = sum(len(p) for p in train_parts + eval_parts)
    report.train_examples, report.eval_examples = len(train), len(evals)
    if not train:
        raise DataError(
            "no usable training examples: "
            + report.summary()
            + ("\n  " + "\n  ".join(report.bad_examples) if report.bad_examples else "")
        )
    return train, evals, report
