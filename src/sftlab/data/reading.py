"""Read one source into flat token arrays: in chunks, in worker processes, through the cache.

`prepare_source(source, tokenizer, cfg, template)` returns the source's examples: from the cache
entry (cache.py) when its key matches, else built by `read_source` and then cached (or built in
a temporary directory when the cache is off). The rows are streamed in chunks of
`ROWS_PER_CHUNK`; each chunk is normalised, rendered, tokenized and labelled (tokenize.py), here
or in `num_proc` worker processes, and appended to flat token arrays on disk (arrays.py). Peak
memory does not grow with the data set: only a few chunks are in flight. For a ChatML-family
template the direct renderer (fast_chatml.py) is used where it is checked identical; a sampled
conversation that disagrees makes the source read again from the start through the template.

For a vision-language model (`processor` given) the rows are read with their images (data/vision.py)
and each example's image references are stored beside its tokens; over-length image rows are bad
rows (never truncated), so `max_seq_length` joins the cache key.

Bad rows are counted and skipped (or, with `on_bad_record: error`, the first one is the error), except
rows with images (content parts, or LLaMA-Factory's images/videos/audios columns): a text-only model
cannot train on images at all, so once the source is
read they are one `DataError` naming the source, the first few rows and their count, before any
training (`image_rows_error`).
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.config.schema import DataConfig
from sftlab.data import cache
from sftlab.data.arrays import TOKEN_ARRAYS, ArrayWriter, TokenArrays, id_dtype, write_chunk_files
from sftlab.data.fast_chatml import FastPathMismatch
from sftlab.data.records import Conversation
from sftlab.data.sources import Source
from sftlab.data.tokenize import ChunkContext, RawChunk, compact_example, detect_chatml, encode_text_rows
from sftlab.data.types import BadRecord, DataError, ImageRow
from sftlab.data.vision import encode_vision_rows, processor_fingerprint

log = logging.getLogger(__name__)
MAX_CITED = 5  # rows named in a source-level error
ROWS_PER_CHUNK = 512  # rows per unit of work (fixed: the arrays' chunk checksums do not depend on num_proc)
FAST_RENDER_NOTE = "rendered by the direct ChatML renderer (checked against the template on a sample)"


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


def _raw_chunks(source: Source, data: cache.SourceData, rows_per_chunk: int) -> Iterator[RawChunk]:
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
    chunks: Iterator[RawChunk], ctx: ChunkContext, data: cache.SourceData, num_proc: int, directory: Path
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


def _note_bad(data: cache.SourceData, err: BadRecord, strict: bool) -> None:
    if strict:
        raise DataError(str(err))
    data.bad += 1
    data.bad_reasons[err.reason] += 1
    if len(data.bad_examples) < cache.MAX_BAD_EXAMPLES:
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
) -> cache.SourceData:
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


def _read_chunks(source: Source, ctx: ChunkContext, cfg: DataConfig, directory: Path) -> cache.SourceData:
    strict = cfg.on_bad_record == "error"
    data = cache.SourceData()
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
) -> cache.SourceData:
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
) -> cache.SourceData:
    """The source's examples, from the cache when its key matches (and its checksums hold, and for a
    vision-language model its image files are unchanged), else built (and then cached). `processor`:
    a vision-language model's (its settings and max_seq_length join the key)."""
    if not cfg.cache:
        return _read_uncached(source, tokenizer, cfg, template, processor)
    parts = {
        "source": source.fingerprint(),
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "template": template or tokenizer.chat_template,
        "format": source.format,
        "loss_on": cfg.loss_on,
        "tools": cfg.tools,
        "columns": source.columns.columns,
        "roles": source.columns.roles,
        "code": cache.code_fingerprint(),
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
    key = cache.cache_key(parts)
    root = cache.cache_dir(cfg.cache_dir)
    data = cache.load(root, key)
    if data is not None:
        if cfg.on_bad_record == "error" and data.bad:
            raise DataError(data.bad_examples[0])
        return data
    tmp = None
    try:
        tmp = cache.new_entry_dir(root, key)
        data = read_source(source, tokenizer, cfg, template, tmp, processor)
        readable = {**parts, "name": source.name, "template": cache.cache_key({"t": parts["template"]})}
        data.arrays = TokenArrays(cache.commit(tmp, root, key, data, readable), verify=False)
        return data
    except OSError as e:  # an unwritable cache costs the next run time, never this run
        log.warning("could not write the data cache entry for %s in %s: %s", source.name, root, e)
        return _read_uncached(source, tokenizer, cfg, template, processor)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
