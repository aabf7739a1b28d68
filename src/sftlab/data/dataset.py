"""Build tokenized, masked train/validation sets from the configured sources.

`build_datasets(cfg, tokenizer, seed)` is the entry point. Every source (sources.py) is read into
flat token arrays on disk, chunk by chunk, here or in worker processes, through the cache
(reading.py). Then it applies the length policy, mixes the sources by weight and splits off
validation (mixing.py), all on index arrays (`Examples`); the tokens stay memory-mapped. Every
decision is counted in `DataReport` (report.py), per source (with the format each row was read as,
the fields no reader used, the `columns` / `roles` entries no row used, the target-token share and
the lengths), and all validation happens here, before training starts: `data.max_bad_fraction` holds
for each source on its own, a source (train source or eval set) left with no example is an error
naming it, and rows whose tools the chat template does not render stop the run, or with `data.tools:
drop` are trained without them under one warning counting them (rendering.py). For a vision-language model (`processor`) the rows are read
with their images, and the report counts each source's images and image tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data import cache
from sftlab.data.examples import Examples
from sftlab.data.markers import markers_for
from sftlab.data.mixing import check_weight, hold_out, mix
from sftlab.data.reading import FAST_RENDER_NOTE, check_sendable, prepare_source
from sftlab.data.report import DataReport, SourceStats, count_targets, length_stats
from sftlab.data.sources import DatasetSource, SourceSpec, open_source
from sftlab.data.templates import load_template
from sftlab.data.types import IGNORE_INDEX, DataError
from sftlab.data.vision import image_token_ids

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
FROM_CONFIG = object()  # build_datasets resolves the template from the config


def apply_length_policy(
    data: cache.SourceData, cfg: DataConfig, report: DataReport, stats: SourceStats
) -> Examples:
    """The source's usable examples: those longer than max_seq_length kept, dropped, truncated or
    refused; what was done is counted in the source's `stats` (the report sums them)."""
    examples = Examples.whole(data.arrays) if data.arrays is not None else Examples.empty()
    m = cfg.max_seq_length
    over = np.flatnonzero(examples.length > m)
    if not len(over):
        return examples
    if cfg.on_overlength == "error":
        i = int(over[0])
        raise DataError(
            f"{data.where(i)}: {int(examples.length[i])} tokens exceed data.max_seq_length={m} "
            "(set data.on_overlength to drop or truncate)"
        )
    keep = np.ones(len(examples), dtype=bool)
    keep[over] = False
    if cfg.on_overlength == "drop":
        stats.dropped += len(over)
        return examples.select(np.flatnonzero(keep))
    store = data.arrays
    for i in over:
        start = int(examples.start[i])
        if store.count_targets(start, start + m) == 0:
            stats.no_target += 1
            continue
        keep[i] = True
        stats.truncated += 1
        if np.all(store.tokens(start + m - 1, start + m + 1)[1] != IGNORE_INDEX):
            report.truncated_inside_turn += (
                1  # the labelled run (a turn and its end-of-turn token) continues past the cut
            )
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


def count_images(data: cache.SourceData, examples: Examples, stats: SourceStats, processor: Any) -> None:
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


def _check_bad_rows(label: str, data: cache.SourceData, cfg: DataConfig) -> None:
    """data.max_bad_fraction holds for each source: a bad source is not hidden by good ones."""
    if data.rows and data.bad / data.rows > cfg.max_bad_fraction:
        raise DataError(
            f"{label}: {data.bad} of {data.rows} rows are bad (> data.max_bad_fraction="
            f"{cfg.max_bad_fraction}, which applies to each source); first problems:\n  "
            + "\n  ".join(data.bad_examples[:5])
        )


def _check_not_empty(
    label: str, data: cache.SourceData, examples: Examples, stats: SourceStats, cfg: DataConfig
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
