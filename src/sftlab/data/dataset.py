"""Build tokenized, masked train/validation sets from the configured sources.

`build_datasets(cfg, tokenizer, seed)` is the entry point. For every source (sources.py) it streams
the rows in chunks; each chunk is normalised, rendered, tokenized and labelled (tokenize.py), here
or in `num_proc` worker processes, and appended to flat token arrays on disk (arrays.py): the
cache entry (cache.py), or a temporary directory when the cache is off. Peak memory does not grow
with the data set: only a few chunks are in flight. Then it applies the length policy, mixes the
sources by weight and splits off validation (mixing.py), all on index arrays (`Examples`); the
tokens stay memory-mapped. Every decision is counted in `DataReport`, per source (with the format
each row was read as, the fields no reader used, the target-token share and the lengths), and all
validation happens here, before training starts.
"""

from __future__ import annotations

import difflib
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.config import ROW_FIELDS, DataConfig, SourceConfig
from sftlab.data import cache
from sftlab.data.arrays import TOKEN_ARRAYS, ArrayWriter, TokenArrays, id_dtype
from sftlab.data.examples import Examples
from sftlab.data.fast_chatml import FastPathMismatch
from sftlab.data.masking import detect_chatml
from sftlab.data.mixing import check_weight, hold_out, mix
from sftlab.data.sources import DatasetSource, Source, SourceSpec, open_source
from sftlab.data.templates import load_template
from sftlab.data.tokenize import (
    ChunkContext,
    ChunkResult,
    RawChunk,
    encode_chunk,
    init_worker,
    worker_chunk,
)
from sftlab.data.types import IGNORE_INDEX, BadRecord, DataError

__all__ = ["DataError", "DataReport", "DatasetSource", "SourceStats", "build_datasets", "load_template"]

log = logging.getLogger(__name__)
ROWS_PER_CHUNK = 512  # rows per unit of work (fixed: the arrays' chunk checksums do not depend on num_proc)
FROM_CONFIG = object()  # build_datasets resolves the template from the config
FAST_RENDER_NOTE = "rendered by the direct ChatML renderer (checked against the template on a sample)"


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
    tokens: int = 0  # of its usable examples (after the length policy, before mixing)
    targets: int = 0  # of those tokens, the ones with a label (not -100)
    lengths: dict[str, int] = field(default_factory=dict)  # min, median, p95, max tokens of its usable examples

    def line(self) -> str:
        parts = [f"{self.rows} rows", f"{self.bad} bad", f"{self.examples} examples"]
        parts += [f"{n} {what}" for n, what in ((self.dropped, "over length dropped"), (self.truncated, "truncated"),
                                                  (self.no_target, "no target after truncation")) if n]
        used = f"{self.used} {self.split}" + (f" (weight {self.weight})" if self.weight is not None else "")
        held = f", {self.held_out} eval" if self.held_out else ""
        how = " (cached)" if self.cached else ""
        how += " (direct ChatML rendering, checked against the template)" if self.fast_render else ""
        return f"{self.name}: {', '.join(parts)} -> {used}{held}{how}"

    def details(self) -> list[str]:
        """Format(s) read, target share and lengths; a warning line for fields that no reader used."""
        formats = ", ".join(f"{fmt} ({n} rows)" for fmt, n in sorted(self.formats.items(), key=lambda x: -x[1]))
        parts = [f"format: {formats or '-'}"]
        if self.tokens:
            parts.append(f"targets: {self.targets / self.tokens:.1%} of {self.tokens:,} tokens")
        if self.lengths:
            parts.append("lengths: " + ", ".join(f"{k} {v}" for k, v in self.lengths.items()) + " tokens")
        lines = ["; ".join(parts)]
        if self.unknown_fields:
            fields = ", ".join(f"{k} ({n} rows{_field_hint(k, self.formats)})"
                               for k, n in sorted(self.unknown_fields.items(), key=lambda x: -x[1]))
            lines.append(f"warning: fields no reader of the format uses, ignored: {fields} "
                         "(map them with the source's `columns` if they hold data; docs/data.md)")
        return lines


def _field_hint(name: str, formats: dict[str, int]) -> str:
    """'; did you mean X?' when an unknown field looks like a field of a format the source was read as."""
    fields = [f for fmt in formats for f in ROW_FIELDS.get(fmt, ())]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    close = close or [f for f in fields if len(name) > 3 and name in f]  # spans -> loss_masking_spans
    return f"; did you mean {close[0]}?" if close else ""


@dataclass
class DataReport:
    rows: int = 0
    kept: int = 0  # usable examples (after bad rows and length policy), before mixing
    bad: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    overlength_dropped: int = 0
    overlength_truncated: int = 0
    truncated_inside_turn: int = 0  # of the truncated: the cut fell inside a labelled turn (its end-of-turn token lost)
    no_target_after_truncation: int = 0
    sources: list[SourceStats] = field(default_factory=list)
    train_examples: int = 0
    eval_examples: int = 0
    # per source, in `sources` order: what it read and its usable examples (for `sftlab prepare --show`)
    source_data: list[cache.SourceData] = field(default_factory=list, repr=False, compare=False)
    source_examples: list[Examples] = field(default_factory=list, repr=False, compare=False)
    eval_sets: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)  # name -> eval positions

    @property
    def unknown_fields(self) -> dict[str, dict[str, int]]:
        """Source name -> its unknown fields and the rows holding each (sources with any)."""
        return {s.name: s.unknown_fields for s in self.sources if s.unknown_fields}

    def sources_json(self) -> list[dict]:
        return [asdict(s) for s in self.sources]

    def summary(self) -> str:
        """Totals on the first line, then one line per source."""
        parts = [f"{self.kept} examples kept of {self.rows} rows (train {self.train_examples}, "
                 f"eval {self.eval_examples} after mixing)"]
        if self.bad:
            parts.append(f"{self.bad} bad rows skipped ({dict(self.bad_reasons.most_common(5))})")
        if self.overlength_dropped:
            parts.append(f"{self.overlength_dropped} over max_seq_length dropped")
        if self.overlength_truncated:
            parts.append(f"{self.overlength_truncated} truncated to max_seq_length"
                         + (f" ({self.truncated_inside_turn} cut inside a trained turn: that turn keeps its start "
                            "but loses its end-of-turn token)" if self.truncated_inside_turn else ""))
        if self.no_target_after_truncation:
            parts.append(f"{self.no_target_after_truncation} dropped: no target token left after truncation")
        lines = ["; ".join(parts)]
        for s in self.sources:
            lines.append("  " + s.line())
            lines += ["    " + d for d in s.details()]
        return "\n".join(lines)


# --- one source: read in chunks, encode (in worker processes), append to flat arrays ----------

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


def _encoded_chunks(chunks: Iterator[RawChunk], ctx: ChunkContext, data: cache.SourceData, num_proc: int,
                    directory: Path) -> Iterator[ChunkResult]:
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers, not tokenizer threads, share the cores
    with ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method),
                             initializer=init_worker, initargs=(ctx, str(directory))) as pool:
        pending: deque = deque()
        for number, chunk in enumerate(chunks):
            pending.append(pool.submit(worker_chunk, number, chunk, names()))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def check_sendable(ctx: ChunkContext, num_proc: int, method: str) -> None:
    """Workers started by `spawn` get the formatting function pickled: one that cannot be (a lambda, a
    local function) fails here, before any row is read, with the fix named."""
    if ctx.formatting_func is None or method == "fork":
        return
    try:
        pickle.dumps(ctx.formatting_func)
    except Exception as e:  # noqa: BLE001 - pickling errors vary by object
        raise DataError(f"data source {ctx.source}: formatting_func cannot be sent to the data.num_proc={num_proc} "
                        f"worker processes ({type(e).__name__}: {e}); define it at module level, or set "
                        "data.num_proc=1") from None


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


def read_source(source: Source, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, template: str | None,
                directory: Path) -> cache.SourceData:
    """Read, normalise, tokenize and label one source into flat arrays in `directory`, chunk by chunk.

    Memory stays bounded: a few chunks are in flight at a time. Raises on the first bad row when strict.
    For a ChatML-family template the direct renderer is used where it is checked identical; if a
    sampled conversation disagrees, the source is read again from the start through the template.
    """
    ctx = ChunkContext(tokenizer, source.name, [], source.format, cfg.loss_on, template, id_dtype(len(tokenizer)))
    ctx.columns, ctx.formatting_func = source.columns, source.formatting_func
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
    writer = ArrayWriter(directory, ctx.ids_dtype)
    try:
        for res in _encoded_chunks(_raw_chunks(source, data, ROWS_PER_CHUNK), ctx, data, cfg.num_proc, directory):
            data.rows += res.rows
            data.conversations += res.conversations
            data.formats.update(res.formats)
            data.unknown.update(res.unknown)
            for err in res.bad:
                _note_bad(data, err, strict)
            for name in TOKEN_ARRAYS:
                part = res.tokens[name]
                writer.append_file(name, *part) if isinstance(part, tuple) else writer.append(name, part)
            writer.add_examples(res.lengths, res.lines, res.files, res.fix_pos, res.fix_val)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    data.arrays = TokenArrays(directory, verify=False)
    return data


def _read_uncached(source: Source, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                   template: str | None) -> cache.SourceData:
    """Build the arrays in a temporary directory that is removed at once: the open memory maps keep
    the files readable until the run ends (POSIX), and nothing is left behind."""
    tmp = Path(tempfile.mkdtemp(prefix="sftlab-data-"))
    try:
        return read_source(source, tokenizer, cfg, template, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_source(source: Source, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                   template: str | None) -> cache.SourceData:
    """The source's examples, from the cache when its key matches (and its checksums hold), else built
    (and then cached)."""
    if not cfg.cache:
        return _read_uncached(source, tokenizer, cfg, template)
    parts = {"source": source.fingerprint(), "tokenizer": cache.tokenizer_fingerprint(tokenizer),
             "template": template or tokenizer.chat_template, "format": source.format, "loss_on": cfg.loss_on,
             "columns": source.columns.columns, "roles": source.columns.roles, "code": cache.code_fingerprint(),
             **({"formatting_func": formatting_fingerprint(source.formatting_func)} if source.formatting_func else {})}
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
        data = read_source(source, tokenizer, cfg, template, tmp)
        readable = {**parts, "name": source.name, "template": cache.cache_key({"t": parts["template"]})}
        data.arrays = TokenArrays(cache.commit(tmp, root, key, data, readable), verify=False)
        return data
    except OSError as e:  # an unwritable cache costs the next run time, never this run
        log.warning("could not write the data cache entry for %s in %s: %s", source.name, root, e)
        return _read_uncached(source, tokenizer, cfg, template)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def apply_length_policy(data: cache.SourceData, cfg: DataConfig, report: DataReport,
                        stats: SourceStats | None = None) -> Examples:
    """The source's usable examples: those longer than max_seq_length kept, dropped, truncated or
    refused; what was done is counted."""
    stats = stats or SourceStats("", "")
    examples = Examples.whole(data.arrays) if data.arrays is not None else Examples.empty()
    m = cfg.max_seq_length
    over = np.flatnonzero(examples.length > m)
    if not len(over):
        return examples
    if cfg.on_overlength == "error":
        i = int(over[0])
        raise DataError(f"{data.where(i)}: {int(examples.length[i])} tokens exceed data.max_seq_length={m} "
                        "(set data.on_overlength to drop or truncate)")
    keep = np.ones(len(examples), dtype=bool)
    keep[over] = False
    if cfg.on_overlength == "drop":
        report.overlength_dropped += len(over)
        stats.dropped += len(over)
        return examples.select(np.flatnonzero(keep))
    store = data.arrays
    for i in over:
        start = int(examples.start[i])
        if store.count_targets(start, start + m) == 0:
            report.no_target_after_truncation += 1
            stats.no_target += 1
            continue
        keep[i] = True
        report.overlength_truncated += 1
        stats.truncated += 1
        if np.all(store.tokens(start + m - 1, start + m + 1)[1] != IGNORE_INDEX):
            report.truncated_inside_turn += 1  # the labelled run (a turn and its end-of-turn token) continues past the cut
    examples.length[over] = m
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


def _prepare_split(specs: Sequence[SourceSpec], split: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                   template: str | None, report: DataReport, formatting_func: Any = None) -> list[Examples]:
    """Usable examples per source (after the length policy); stats land in `report.sources`."""
    for spec in specs:
        check_weight(*_weight_of(spec))
    out = []
    for i, spec in enumerate(specs):
        source = open_source(spec, i)
        source.formatting_func = formatting_func
        data = prepare_source(source, tokenizer, cfg, template)
        stats = SourceStats(f"{split}[{i}] {source.name}", split, source.weight, rows=data.rows, bad=data.bad,
                            examples=len(data), cached=data.cached, fast_render=FAST_RENDER_NOTE in data.notes,
                            formats=dict(data.formats), unknown_fields=dict(data.unknown))
        report.sources.append(stats)
        report.rows += data.rows
        report.bad += data.bad
        report.bad_reasons.update(data.bad_reasons)
        report.bad_examples.extend(data.bad_examples[: max(0, 5 - len(report.bad_examples))])
        examples = apply_length_policy(data, cfg, report, stats)
        stats.tokens, stats.targets = examples.num_tokens, count_targets(data, examples)
        stats.lengths = length_stats(examples.lengths)
        report.source_data.append(data)
        report.source_examples.append(examples)
        out.append(examples)
    return out


def length_stats(lengths: np.ndarray) -> dict[str, int]:
    """min, median, p95 and max of example lengths in tokens ({} for none)."""
    if not len(lengths):
        return {}
    q = np.percentile(lengths, [50, 95], method="nearest")
    return {"min": int(lengths.min()), "median": int(q[0]), "p95": int(q[1]), "max": int(lengths.max())}


def count_targets(data: cache.SourceData, examples: Examples) -> int:
    """Tokens with a label (not -100) in `examples` (all from `data.arrays`, truncation included)."""
    store = data.arrays
    if store is None or not len(examples):
        return 0
    starts = store.offsets[:-1]
    per = np.add.reduceat(store.targets, starts, dtype=np.int64)
    per += np.diff(np.searchsorted(store.fix_pos, store.offsets))  # labels other than the id are targets too
    idx = np.searchsorted(store.offsets, examples.start, side="right") - 1
    whole = examples.length == store.lengths[idx]
    cut = np.flatnonzero(~whole)
    return int(per[idx[whole]].sum()) + sum(
        int(np.count_nonzero(store.tokens(int(examples.start[k]), int(examples.start[k] + examples.length[k]))[1]
                             != IGNORE_INDEX)) for k in cut)


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                   train_sources: Sequence[SourceSpec] | None = None,
                   eval_sources: Sequence[SourceSpec] | None = None,
                   template: str | None | object = FROM_CONFIG, formatting_func: Any = None,
                   ) -> tuple[Examples, Examples, DataReport]:
    """Return (train, eval, report); train and eval are `Examples` over memory-mapped token arrays.

    `train_sources` / `eval_sources` add sources after the configured `cfg.train` / `cfg.eval`:
    SourceConfig objects, `datasets.Dataset` objects, or `DatasetSource(dataset, name, format, weight)`.
    Eval comes from the eval sources, else a seeded `eval_fraction` of the mixed training examples;
    `report.eval_sets` gives the positions in eval of each NAMED eval source (SourceConfig.name,
    DatasetSource.name), sources of the same name together.
    `formatting_func` (the Python API's) turns every row into messages, {prompt, completion} or text.
    `template`: the chat template text when the caller resolved it already (`load_template`).
    """
    report = DataReport()
    if template is FROM_CONFIG:
        template = load_template(cfg, tokenizer)
    train_specs = [*cfg.train, *(train_sources or [])]
    eval_specs = [*cfg.eval, *(eval_sources or [])]
    train_parts = _prepare_split(train_specs, "train", tokenizer, cfg, template, report, formatting_func)
    eval_parts = _prepare_split(eval_specs, "eval", tokenizer, cfg, template, report, formatting_func)
    if report.rows and report.bad / report.rows > cfg.max_bad_fraction:
        raise DataError(
            f"{report.bad} of {report.rows} rows are bad (> data.max_bad_fraction={cfg.max_bad_fraction}); "
            "first problems:\n  " + "\n  ".join(report.bad_examples)
        )
    train_stats, eval_stats = report.sources[: len(train_parts)], report.sources[len(train_parts):]
    train_sel = mix([len(p) for p in train_parts], [s.weight for s in train_stats], seed)
    eval_sel = mix([len(p) for p in eval_parts], [s.weight for s in eval_stats], seed)
    held = [np.zeros(0, dtype=np.int64) for _ in train_parts]
    if not eval_parts and cfg.eval_fraction > 0:
        train_sel, held = hold_out(train_sel, cfg.eval_fraction, seed)
    train = Examples.concat([part.select(picks) for part, picks in zip(train_parts, train_sel)])
    evals = Examples.concat([part.select(picks) for part, picks in zip(eval_parts, eval_sel)]
                            + [part.select(picks) for part, picks in zip(train_parts, held)])
    for stats, picks, h in zip(train_stats, train_sel, held):
        stats.used, stats.held_out = len(picks), len(h)
    for stats, picks in zip(eval_stats, eval_sel):
        stats.used = len(picks)
    report.eval_sets = named_positions([_name_of(spec) for spec in eval_specs], [len(p) for p in eval_sel])
    report.kept = sum(len(p) for p in train_parts + eval_parts)
    report.train_examples, report.eval_examples = len(train), len(evals)
    if not train:
        raise DataError("no usable training examples: " + report.summary()
                        + ("\n  " + "\n  ".join(report.bad_examples) if report.bad_examples else ""))
    return train, evals, report
