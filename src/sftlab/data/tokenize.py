"""One chunk of raw rows -> compact token arrays: normalise, render, tokenize, label.

`encode_chunk(rows, ctx)` is the unit of work of data preparation, run in the main process or in
`num_proc` worker processes (`worker_chunk`, which writes the chunk's token arrays to files of its
own). It returns the chunk's tokens as flat arrays (ids, target flags), per-example lengths and
locations, its bad rows in order, and per chunk the rows read as each format, the rows holding
each unknown field and the rows using each entry of the source's `columns` / `roles` (summed over
chunks by the caller); nothing of a chunk outlives its appending to the entry.

Before chat rows are rendered, `data.tools` is applied (rendering.py): a row whose tools, tool
calls or tool results the template would not render stops the run (DataError naming the row), or
has them dropped and is counted (`tools_dropped`).

Text rows (`format: text`) are tokenized without a chat template, with the tokenizer's own special
tokens (e.g. a BOS). A token that overlaps a character of a `loss_masking_spans` span carries no
loss; every other token is a target. The source's response/instruction templates (markers.py) only
add spans to those, when the row is read (records.py), so they are marked the same way. The EOS token is appended, as a target, unless the text
already ends with it, so the model learns where a document stops. Pretokenized rows are used as
they are. Any example left without a target token is a bad record.

For a vision-language model (the context carries its processor) chat rows are read with their images
and tokenized by data/vision.py; the chunk then also returns each example's image references.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.data import masking
from sftlab.data.arrays import example_arrays, write_chunk_files
from sftlab.data.fast_chatml import VERIFY_EVERY, ChatMLRenderer
from sftlab.data.markers import TextMarkers
from sftlab.data.records import ColumnMap, Conversation, Record, TextRecord, formatted_row, to_record
from sftlab.data.rendering import handle_tools
from sftlab.data.types import (
    IGNORE_INDEX,
    BadRecord,
    DataError,
    TemplateError,
    TokenizedExample,
)
from sftlab.data.vision import encode_vision_rows

RawChunk = list[tuple[int, int, str, Any]]  # (file index, line or row, unit, parsed row or BadRecord)
# characters tokenized in one batch: a chunk of long rows (512 x 4096 tokens) is tokenized in parts,
# each turned into compact arrays before the next, since the tokenizer's output (ids, offsets as Python
# objects) costs ~250 bytes a token; the rows, tokens and arrays are the same as in one batch
TOKENIZE_CHARS = 1 << 20


@dataclass
class ChunkContext:
    """What every chunk of one source is encoded with."""

    tokenizer: PreTrainedTokenizerBase
    source: str  # display name, for errors
    files: list[str]  # file index -> name (grows as the source is read; workers get it with the chunk)
    format: str
    loss_on: str
    template: str | None
    ids_dtype: str
    fast: ChatMLRenderer | None = None  # the direct renderer, where the template is ChatML (fast_chatml.py)
    columns: ColumnMap = field(default_factory=ColumnMap)  # the source's `columns` / `roles`
    formatting_func: Any = None  # the Python API's row -> messages | {prompt, completion} | text
    markers: TextMarkers | None = None  # the source's response/instruction templates (text rows)
    tools: str = "error"  # data.tools: tools the template does not render stop the run, or are dropped
    add_bos: bool = False  # data.add_bos: chat rows start with the tokenizer's BOS (never a target)
    processor: Any = None  # a vision-language model's processor: rows are read with their images
    max_length: int | None = None  # vision rows longer than this (images expanded) are bad rows
    image_dir: str | None = None  # where images held in memory are written (the cache entry)


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


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive [start, end] spans -> sorted, disjoint half-open [start, end + 1) spans."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e + 1))
        else:
            out.append((s, e + 1))
    return out


def _tokenize_texts(tokenizer: PreTrainedTokenizerBase, recs: list[TextRecord]) -> list[TokenizedExample]:
    """Text rows: every token a target except those overlapping a loss-masking span; EOS appended."""
    if not tokenizer.is_fast and any(r.spans for r in recs):
        raise DataError(
            "text rows with loss_masking_spans or a response_template need a fast tokenizer "
            "(character offsets)"
        )
    enc = tokenizer([r.text for r in recs], add_special_tokens=True, return_offsets_mapping=tokenizer.is_fast)
    eos = tokenizer.eos_token_id
    out = []
    for k, r in enumerate(recs):
        ids = list(enc["input_ids"][k])
        masked = (
            masking.labels_from_spans(enc["offset_mapping"][k], _merge(r.spans))
            if r.spans
            else [False] * len(ids)
        )
        labels = [IGNORE_INDEX if m else t for t, m in zip(ids, masked)]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        out.append(TokenizedExample(ids, labels))
    return out


def _tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    convs: list[Conversation],
    loss_on: str,
    template: str | None,
    fast: ChatMLRenderer | None = None,
    verify: list[bool] | None = None,
) -> list[TokenizedExample | BadRecord]:
    """One batched masking call; a conversation the template cannot mask becomes a BadRecord."""
    results = masking.tokenize_conversations(
        tokenizer,
        [c.messages for c in convs],
        loss_on,
        template,
        [c.tools for c in convs],
        on_error="return",
        fast=fast,
        verify=verify,
    )
    return [
        BadRecord(c.source, c.line, "messages", str(res), c.unit) if isinstance(res, TemplateError) else res
        for c, res in zip(convs, results)
    ]


def with_bos(example: TokenizedExample, bos: int | None) -> TokenizedExample:
    """data.add_bos: the example with the BOS token first (no loss on it), unless it already starts with it."""
    if bos is None or (example.input_ids and example.input_ids[0] == bos):
        return example
    return TokenizedExample([bos, *example.input_ids], [IGNORE_INDEX, *example.labels])


def tokenize_chunk(
    records: list[Record],
    tokenizer: PreTrainedTokenizerBase,
    loss_on: str,
    template: str | None,
    source: str = "",
    fast: ChatMLRenderer | None = None,
    verify_all: bool = False,
    add_bos: bool = False,
    first: int = 0,
) -> list[TokenizedExample | BadRecord]:
    """Tokenize and label records of any kind, in order; unusable ones come back as BadRecord.

    With a direct renderer `fast`, conversations at positions divisible by VERIFY_EVERY (all of them
    with `verify_all`) are checked against the template; `first`: the position of `records[0]` in its chunk. `add_bos`: conversations whose template
    writes no BOS get the tokenizer's (text rows already have the tokenizer's own special tokens)."""
    out: list[Any] = [None] * len(records)
    by_kind: dict[type, list[int]] = {}
    for i, r in enumerate(records):
        by_kind.setdefault(type(r), []).append(i)
    if Conversation in by_kind and not (template or tokenizer.chat_template):
        raise DataError(
            f"data source {source}: chat rows need a chat template, and the tokenizer has none; "
            "set data.chat_template"
        )
    for kind, idx in by_kind.items():
        group = [records[i] for i in idx]
        if kind is Conversation:
            verify = [verify_all or (first + i) % VERIFY_EVERY == 0 for i in idx]
            results: list[Any] = _tokenize_conversations(tokenizer, group, loss_on, template, fast, verify)
            if add_bos:
                if tokenizer.bos_token_id is None:
                    raise DataError("data.add_bos: the tokenizer has no BOS token")
                results = [
                    with_bos(r, tokenizer.bos_token_id) if isinstance(r, TokenizedExample) else r
                    for r in results
                ]
        elif kind is TextRecord:
            results = _tokenize_texts(tokenizer, group)
        else:
            results = [TokenizedExample(list(r.input_ids), list(r.labels)) for r in group]
        for i, res in zip(idx, results):
            out[i] = res
    for i, (r, res) in enumerate(zip(records, out)):
        if isinstance(res, TokenizedExample) and res.num_targets == 0:
            out[i] = BadRecord(r.source, r.line, None, "no target tokens: every label is masked", r.unit)
    return out


def _size(rec: Record) -> int:
    """About how many characters `rec` renders to (token ids count as 4)."""
    if isinstance(rec, TextRecord):
        return len(rec.text)
    if isinstance(rec, Conversation):
        return sum(len(c) if isinstance(c := m.get("content"), str) else len(str(c)) for m in rec.messages)
    return 4 * len(getattr(rec, "input_ids", ()))


def _batches(records: list[Record], chars: int) -> list[tuple[int, int]]:
    """[a, b) ranges of `records`, each of about `chars` characters at most (at least one record)."""
    out, a, size = [], 0, 0
    for k, rec in enumerate(records):
        n = _size(rec)
        if k > a and size + n > chars:
            out.append((a, k))
            a, size = k, 0
        size += n
    return out + [(a, len(records))] if records else out


def _text_rows(rows: RawChunk, ctx: ChunkContext, number: int) -> tuple[list, list, list, int]:
    """([(k, file index, line, compact arrays)], [(k, BadRecord)], records, tools dropped) of a chunk."""
    records: list[Record] = []
    places: list[tuple[int, int]] = []
    bad: list[tuple[int, BadRecord]] = []
    vocab = len(ctx.tokenizer)
    for k, (f, line, unit, row) in enumerate(rows):
        try:
            if isinstance(row, BadRecord):
                raise row
            columns = ctx.columns
            if ctx.formatting_func is not None:  # the function reads the row's own fields: no renaming after
                row, columns = formatted_row(ctx.formatting_func, row, ctx.files[f], line, unit), None
            records.append(
                to_record(
                    row,
                    ctx.format,
                    ctx.files[f],
                    line,
                    unit=unit,
                    vocab_size=vocab,
                    columns=columns,
                    markers=ctx.markers,
                )
            )
            places.append((k, f))
        except BadRecord as e:
            bad.append((k, e))
    template = ctx.template or ctx.tokenizer.chat_template
    convs = [r for r in records if isinstance(r, Conversation)]
    dropped = (
        handle_tools(convs, template, ctx.tokenizer.special_tokens_map, ctx.tools)
        if convs and isinstance(template, str)
        else 0
    )
    done = []
    for a, b in _batches(records, TOKENIZE_CHARS):  # long rows: the chunk in parts, each compacted at once
        results = tokenize_chunk(
            records[a:b],
            ctx.tokenizer,
            ctx.loss_on,
            ctx.template,
            ctx.source,
            ctx.fast,
            number == 0,
            ctx.add_bos,
            first=a,
        )
        for (k, f), rec, res in zip(places[a:b], records[a:b], results):
            if isinstance(res, BadRecord):
                bad.append((k, res))
            else:
                done.append((k, f, rec.line, _compact(res, ctx.ids_dtype)))
        del results
    return done, bad, records, dropped


def _compact(res: TokenizedExample, ids_dtype: str) -> tuple:
    """An example's arrays (example_arrays), its ids already in the entry's compact dtype."""
    i, t, fp, fv = example_arrays(res.input_ids, res.labels)
    return i.astype(ids_dtype), t, fp, fv


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
        done = [(k, f, line, _compact(res, ctx.ids_dtype)) for k, f, line, res in vision_done]
        images, dropped = [list(res.images) for *_, res in vision_done], 0
        del vision_done
    else:
        done, bad, records, dropped = _text_rows(rows, ctx, number)
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
