"""Build tokenized, masked train/validation sets from the configured sources.

`build_datasets(cfg, tokenizer, seed)` is the entry point. For every source (sources.py) it reads
the rows, normalises them (formats.py), tokenizes and labels them in `num_proc` worker processes,
and caches the result (cache.py); then it applies the length policy, mixes the sources by weight
and splits off validation (mixing.py). Every decision is counted in `DataReport`, per source, and
all validation happens here, before training starts.

Text rows (`format: text`) are tokenized without a chat template, with the tokenizer's own special
tokens (e.g. a BOS). A token that overlaps a character of a `loss_masking_spans` span carries no
loss; every other token is a target. The EOS token is appended, as a target, unless the text
already ends with it, so the model learns where a document stops. Pretokenized rows are used as
they are. Any example left without a target token is a bad record.
"""

from __future__ import annotations

import logging
import os
import math
import multiprocessing
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from sftlab.config import DataConfig, SourceConfig
from sftlab.data import cache, masking
from sftlab.data.formats import Conversation, Record, TextRecord, to_record
from sftlab.data.templates import load_template
from sftlab.data.types import IGNORE_INDEX, BadRecord, DataError, TemplateError, TokenizedExample
from sftlab.data.mixing import check_weight, hold_out, mix
from sftlab.data.sources import DatasetSource, Source, SourceSpec, open_source

__all__ = ["DataError", "DataReport", "DatasetSource", "SourceStats", "build_datasets", "load_template"]

log = logging.getLogger(__name__)
CHUNK = 256  # records per tokenization task
FROM_CONFIG = object()  # build_datasets resolves the template from the config


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

    def line(self) -> str:
        parts = [f"{self.rows} rows", f"{self.bad} bad", f"{self.examples} examples"]
        parts += [f"{n} {what}" for n, what in ((self.dropped, "over length dropped"), (self.truncated, "truncated"),
                                                  (self.no_target, "no target after truncation")) if n]
        used = f"{self.used} {self.split}" + (f" (weight {self.weight})" if self.weight is not None else "")
        held = f", {self.held_out} eval" if self.held_out else ""
        return f"{self.name}: {', '.join(parts)} -> {used}{held}" + (" (cached)" if self.cached else "")


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
        return "\n".join(lines)


# --- tokenization (runs in worker processes when num_proc > 1) -------------------------------

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
        raise DataError("text rows with loss_masking_spans need a fast tokenizer (character offsets)")
    enc = tokenizer([r.text for r in recs], add_special_tokens=True, return_offsets_mapping=tokenizer.is_fast)
    eos = tokenizer.eos_token_id
    out = []
    for k, r in enumerate(recs):
        ids = list(enc["input_ids"][k])
        masked = masking.labels_from_spans(enc["offset_mapping"][k], _merge(r.spans)) if r.spans else [False] * len(ids)
        labels = [IGNORE_INDEX if m else t for t, m in zip(ids, masked)]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            labels.append(eos)
        out.append(TokenizedExample(ids, labels))
    return out


def _tokenize_conversations(tokenizer: PreTrainedTokenizerBase, convs: list[Conversation], loss_on: str,
                            template: str | None) -> list[TokenizedExample | BadRecord]:
    """One batched masking call; a conversation the template cannot mask becomes a BadRecord."""
    results = masking.tokenize_conversations(tokenizer, [c.messages for c in convs], loss_on, template,
                                             [c.tools for c in convs], on_error="return")
    return [BadRecord(c.source, c.line, "messages", str(res), c.unit) if isinstance(res, TemplateError) else res
            for c, res in zip(convs, results)]


def tokenize_chunk(records: list[Record], tokenizer: PreTrainedTokenizerBase, loss_on: str,
                   template: str | None) -> list[TokenizedExample | BadRecord]:
    """Tokenize and label records of any kind, in order; unusable ones come back as BadRecord."""
    out: list[Any] = [None] * len(records)
    by_kind: dict[type, list[int]] = {}
    for i, r in enumerate(records):
        by_kind.setdefault(type(r), []).append(i)
    for kind, idx in by_kind.items():
        group = [records[i] for i in idx]
        if kind is Conversation:
            results: list[Any] = _tokenize_conversations(tokenizer, group, loss_on, template)
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


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: PreTrainedTokenizerBase, loss_on: str, template: str | None) -> None:
    _WORKER.update(tokenizer=tokenizer, loss_on=loss_on, template=template)


def _worker_chunk(records: list[Record]) -> list[TokenizedExample | BadRecord]:
    return tokenize_chunk(records, _WORKER["tokenizer"], _WORKER["loss_on"], _WORKER["template"])


def tokenize_records(records: list[Record], tokenizer: PreTrainedTokenizerBase, loss_on: str,
                     template: str | None, num_proc: int = 1) -> list[TokenizedExample | BadRecord]:
    """Tokenize in chunks of at most CHUNK records, over `num_proc` worker processes; order is preserved."""
    size = max(1, min(CHUNK, math.ceil(len(records) / max(1, num_proc))))
    chunks = [records[i:i + size] for i in range(0, len(records), size)]
    if num_proc <= 1 or len(chunks) <= 1:
        parts = [tokenize_chunk(c, tokenizer, loss_on, template) for c in chunks]
    else:
        # fork where available: no re-import of the caller's __main__ and no start-up cost; the workers
        # only render templates and run the tokenizer (tokenizers turns its own threads off after a fork)
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers, not tokenizer threads, share the cores
        with ProcessPoolExecutor(min(num_proc, len(chunks)), mp_context=multiprocessing.get_context(method),
                                 initializer=_init_worker, initargs=(tokenizer, loss_on, template)) as pool:
            parts = list(pool.map(_worker_chunk, chunks))
    return [x for part in parts for x in part]


# --- one source: read, normalise, tokenize, cache -------------------------------------------

def _note_bad(data: cache.SourceExamples, err: BadRecord, strict: bool) -> None:
    if strict:
        raise DataError(str(err))
    data.bad += 1
    data.bad_reasons[err.reason] += 1
    if len(data.bad_examples) < cache.MAX_BAD_EXAMPLES:
        data.bad_examples.append(str(err))


def read_source(source: Source, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, template: str | None
                ) -> cache.SourceExamples:
    """Read, normalise and tokenize one source (no cache). Raises on the first bad row when strict."""
    strict = cfg.on_bad_record == "error"
    data = cache.SourceExamples()
    file_index: dict[str, int] = {}
    records: list[Record] = []
    for raw in source.rows():
        data.rows += 1
        if raw.source not in file_index:
            file_index[raw.source] = len(data.files)
            data.files.append((raw.source, raw.unit))
        try:
            if isinstance(raw.row, BadRecord):
                raise raw.row
            records.append(to_record(raw.row, source.format, raw.source, raw.line, unit=raw.unit,
                                     vocab_size=len(tokenizer)))
        except BadRecord as e:
            _note_bad(data, e, strict)
    if any(isinstance(r, Conversation) for r in records) and not (template or tokenizer.chat_template):
        raise DataError(f"data source {source.name}: chat rows need a chat template, and the tokenizer has "
                        "none; set data.chat_template")
    for rec, res in zip(records, tokenize_records(records, tokenizer, cfg.loss_on, template, cfg.num_proc)):
        if isinstance(res, BadRecord):
            _note_bad(data, res, strict)
            continue
        data.examples.append(res)
        data.locations.append((file_index[rec.source], rec.line))
    return data


def prepare_source(source: Source, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                   template: str | None) -> cache.SourceExamples:
    """The source's examples, from the cache when its key matches, else built (and then cached)."""
    if not cfg.cache:
        return read_source(source, tokenizer, cfg, template)
    parts = {"source": source.fingerprint(), "tokenizer": cache.tokenizer_fingerprint(tokenizer),
             "template": template or tokenizer.chat_template, "format": source.format, "loss_on": cfg.loss_on,
             "code": cache.code_fingerprint()}
    key = cache.cache_key(parts)
    root = cache.cache_dir(cfg.cache_dir)
    data = cache.load(root, key)
    if data is not None:
        if cfg.on_bad_record == "error" and data.bad:
            raise DataError(data.bad_examples[0])
        return data
    data = read_source(source, tokenizer, cfg, template)
    try:
        readable = {**parts, "name": source.name, "template": cache.cache_key({"t": parts["template"]})}
        cache.save(root, key, data, readable)
    except OSError as e:  # an unwritable cache costs the next run time, never this run
        log.warning("could not write the data cache entry for %s in %s: %s", source.name, root, e)
    return data


def apply_length_policy(ex: TokenizedExample, cfg: DataConfig, report: DataReport, where: str,
                        stats: SourceStats | None = None) -> TokenizedExample | None:
    """Keep, drop, truncate or refuse an example longer than max_seq_length; count what was done."""
    stats = stats or SourceStats("", "")
    n = len(ex.input_ids)
    if n <= cfg.max_seq_length:
        return ex
    if cfg.on_overlength == "error":
        raise DataError(f"{where}: {n} tokens exceed data.max_seq_length={cfg.max_seq_length} "
                        "(set data.on_overlength to drop or truncate)")
    if cfg.on_overlength == "drop":
        report.overlength_dropped += 1
        stats.dropped += 1
        return None
    cut = TokenizedExample(ex.input_ids[: cfg.max_seq_length], ex.labels[: cfg.max_seq_length])
    if cut.num_targets == 0:
        report.no_target_after_truncation += 1
        stats.no_target += 1
        return None
    report.overlength_truncated += 1
    stats.truncated += 1
    m = cfg.max_seq_length
    if ex.labels[m - 1] != IGNORE_INDEX and ex.labels[m] != IGNORE_INDEX:
        report.truncated_inside_turn += 1  # the labelled run (a turn and its end-of-turn token) continues past the cut
    return cut


def _weight_of(spec: SourceSpec) -> tuple[float | int | None, str]:
    if isinstance(spec, SourceConfig):
        return spec.weight, spec.path
    if isinstance(spec, DatasetSource):
        return spec.weight, spec.name or "<Dataset>"
    return None, "<Dataset>"


def _prepare_split(specs: Sequence[SourceSpec], split: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                   template: str | None, report: DataReport) -> list[list[TokenizedExample]]:
    """Usable examples per source (after the length policy); stats land in `report.sources`."""
    for spec in specs:
        check_weight(*_weight_of(spec))
    out = []
    for i, spec in enumerate(specs):
        source = open_source(spec, i)
        data = prepare_source(source, tokenizer, cfg, template)
        stats = SourceStats(f"{split}[{i}] {source.name}", split, source.weight, rows=data.rows, bad=data.bad,
                            examples=len(data.examples), cached=data.cached)
        report.sources.append(stats)
        report.rows += data.rows
        report.bad += data.bad
        report.bad_reasons.update(data.bad_reasons)
        report.bad_examples.extend(data.bad_examples[: max(0, 5 - len(report.bad_examples))])
        usable = []
        for k, ex in enumerate(data.examples):
            kept = apply_length_policy(ex, cfg, report, data.where(k), stats)
            if kept is not None:
                usable.append(kept)
        out.append(usable)
    return out


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int,
                   train_sources: Sequence[SourceSpec] | None = None,
                   eval_sources: Sequence[SourceSpec] | None = None,
                   template: str | None | object = FROM_CONFIG,
                   ) -> tuple[list[TokenizedExample], list[TokenizedExample], DataReport]:
    """Return (train, eval, report).

    `train_sources` / `eval_sources` add sources after the configured `cfg.train` / `cfg.eval`:
    SourceConfig objects, `datasets.Dataset` objects, or `DatasetSource(dataset, name, format, weight)`.
    Eval comes from the eval sources, else a seeded `eval_fraction` of the mixed training examples.
    `template`: the chat template text when the caller resolved it already (`load_template`).
    """
    report = DataReport()
    if template is FROM_CONFIG:
        template = load_template(cfg, tokenizer)
    train_specs = [*cfg.train, *(train_sources or [])]
    eval_specs = [*cfg.eval, *(eval_sources or [])]
    train_parts = _prepare_split(train_specs, "train", tokenizer, cfg, template, report)
    eval_parts = _prepare_split(eval_specs, "eval", tokenizer, cfg, template, report)
    if report.rows and report.bad / report.rows > cfg.max_bad_fraction:
        raise DataError(
            f"{report.bad} of {report.rows} rows are bad (> data.max_bad_fraction={cfg.max_bad_fraction}); "
            "first problems:\n  " + "\n  ".join(report.bad_examples)
        )
    train_stats, eval_stats = report.sources[: len(train_parts)], report.sources[len(train_parts):]
    train_sel = mix([len(p) for p in train_parts], [s.weight for s in train_stats], seed)
    eval_sel = mix([len(p) for p in eval_parts], [s.weight for s in eval_stats], seed)
    held: list[list[int]] = [[] for _ in train_parts]
    if not eval_parts and cfg.eval_fraction > 0:
        train_sel, held = hold_out(train_sel, cfg.eval_fraction, seed)
    train = [train_parts[s][i] for s, picks in enumerate(train_sel) for i in picks]
    evals = [eval_parts[s][i] for s, picks in enumerate(eval_sel) for i in picks]
    evals += [train_parts[s][i] for s, picks in enumerate(held) for i in picks]
    for stats, picks, h in zip(train_stats, train_sel, held):
        stats.used, stats.held_out = len(picks), len(h)
    for stats, picks in zip(eval_stats, eval_sel):
        stats.used = len(picks)
    report.kept = sum(len(p) for p in train_parts + eval_parts)
    report.train_examples, report.eval_examples = len(train), len(evals)
    if not train:
        raise DataError("no usable training examples: " + report.summary()
                        + ("\n  " + "\n  ".join(report.bad_examples) if report.bad_examples else ""))
    return train, evals, report
