"""The data phase of a run, shared by `sftlab train` and `sftlab prepare`.

`prepare_run_data(cfg, console)`: resolve the model path, load the tokenizer (with ChatML tokens
when asked), resolve the chat template ONCE, build the train/eval sets (`data.build_datasets`:
read, normalise, tokenize, mask, cache, length policy, mix, eval split), pack them when
`data.packing` is set, and print the data report. `data.max_seq_length` above the model's
`max_position_embeddings` fails first (a warning when the model configures rope scaling). A
vision-language model (one with a processor) reads its rows with their images, tokenizes with its
processor's tokenizer and template, and collates each micro-batch with its images
(data/vision.py `vision_collate`); packing is refused for it, with the reason. What training needs next (the model path, the
tokenizer's size before new tokens, the units a micro-batch is made of and how to collate them)
travels in `RunData`; `micro_batch_stream` orders the units into the run's micro-batches.

`print_preview(data, cfg, console, n)` (`sftlab prepare --show N`) shows what will be trained:
per source its format(s), target-token share and lengths, N seeded sample examples with their
target tokens marked (data/preview.py), then the packing and a length histogram of the training
set. It only reads what was prepared: the cache and the training run are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from sftlab.config.loading import NO_TRAINING_DATA
from sftlab.config.schema import ConfigError, SFTConfig
from sftlab.data import preview
from sftlab.data.collate import MicroBatchStream, pad_collate
from sftlab.data.dataset import DataReport, build_datasets, length_stats
from sftlab.data.packing import pack_examples, packed_collate, packing_efficiency
from sftlab.data.store import Examples
from sftlab.data.templates import add_chatml_tokens, load_template
from sftlab.data.types import IGNORE_INDEX
from sftlab.data.vision import PACKING_REFUSAL, image_token_ids, vision_collate
from sftlab.model.adapters import base_config, is_adapter_dir
from sftlab.model.loading import load_tokenizer, position_limit, resolve_model_path, with_pad_token
from sftlab.model.vision import is_vision_model, load_processor
from sftlab.trainer.inputs import RunInputs
from sftlab.trainer.run_model import RunTokens


@dataclass
class RunData(RunTokens):
    template: str | None = None  # the chat template text (None: no chat rows, no template)
    train: Examples = None  # memory-mapped token arrays, indexed
    eval: Examples = None  # every eval example (named sets included)
    report: DataReport = None
    units: Sequence[Any] = ()  # what a micro-batch is made of: examples, or packed rows (built when indexed)
    collate: Callable[[list[Any]], dict] = None
    packing_note: str = ""
    eval_sets: dict[str, Examples] = field(default_factory=dict)  # named eval sets: eval/<name>_loss each
    processor: Any = None  # a vision-language model's processor (saved with the model)

    @property
    def eval_collate(self) -> Callable[[list[Any]], dict] | None:
        """How eval examples become a batch: the vision collate for a vision-language run, else padding (None)."""
        return self.collate if self.processor is not None else None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def load_run_tokens(
    cfg: SFTConfig, inputs: RunInputs | None = None, model_path: str | None = None
) -> RunTokens:
    """Where the base weights are and the run's tokenizer (its size before ChatML tokens were added).

    The tokenizer is the one given, else the model's: a saved adapter's own (it may hold added tokens),
    the model object's `name_or_path`, or `model.name_or_path`. `model_path`: the base model's path when
    the run has resolved it already (trainer/run_model.py: resolve_model_settings, for model.dtype: auto)."""
    inputs = inputs or RunInputs()
    adapter_dir = (
        cfg.model.name_or_path if inputs.model is None and is_adapter_dir(cfg.model.name_or_path) else None
    )
    if inputs.model is not None:
        model_path = getattr(inputs.model, "name_or_path", "") or ""
    elif model_path is None:
        model_path = resolve_model_path(base_config(adapter_dir) if adapter_dir else cfg.model)
    tokenizer = inputs.tokenizer
    if tokenizer is None:
        source = (
            adapter_dir
            if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").is_file()
            else model_path
        )
        if not source:
            raise ConfigError(
                "the model object has no name_or_path to load its tokenizer from: pass tokenizer="
            )
        tokenizer = load_tokenizer(cfg.model, source)
    else:
        with_pad_token(tokenizer)
    vocab_before = len(tokenizer)
    if cfg.data.add_chatml_tokens:
        add_chatml_tokens(tokenizer)
    return RunTokens(model_path, tokenizer, vocab_before, adapter_dir)


def with_resolved_length(
    cfg: SFTConfig, inputs: RunInputs | None, model_path: str | None, console: Console | None
) -> SFTConfig:
    """`data.max_seq_length: null` becomes the model's max_position_embeddings (printed); refused when the
    model's config names none. Any other value is returned as it is."""
    if cfg.data.max_seq_length is not None:
        return cfg
    model = inputs.model if inputs is not None else None
    if model is not None:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
        where = "the model object's config"
    else:
        adapter_dir = cfg.model.name_or_path if is_adapter_dir(cfg.model.name_or_path) else None
        path = model_path or resolve_model_path(base_config(adapter_dir) if adapter_dir else cfg.model)
        limit, where = position_limit(cfg.model, path)[0], path
    if not isinstance(limit, int):
        raise ConfigError(
            f"data.max_seq_length: null takes the model's max_position_embeddings, and {where} names none: "
            "set data.max_seq_length to a number of tokens"
        )
    if console is not None:
        console.print(
            f"[bold]data.max_seq_length[/bold]: null -> {limit} (the model's max_position_embeddings)",
            highlight=False,
        )
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_seq_length": limit})})


def check_sequence_length(cfg: SFTConfig, model_path: str, console: Console | None) -> None:
    """max_seq_length must fit the model's positions (beyond them it was never trained), unless rope
    scaling is configured, which extends them: then a warning."""
    limit, scaling = position_limit(cfg.model, model_path)
    max_seq_length = cfg.data.max_seq_length
    if limit is None or max_seq_length <= limit:
        return
    if scaling is None:
        raise ConfigError(
            f"data.max_seq_length ({max_seq_length}) is above the model's max_position_embeddings ({limit}, "
            f"{model_path}): set data.max_seq_length to {limit} or less"
        )
    if console is not None:
        console.print(
            f"[bold yellow]warning[/bold yellow]: data.max_seq_length ({max_seq_length}) is above the model's "
            f"max_position_embeddings ({limit}); its rope scaling ({scaling}) must cover it",
            highlight=False,
        )


def run_processor(cfg: SFTConfig, model_path: str, inputs: RunInputs) -> Any:
    """A vision-language model's processor (None for a text-only model); its packing is refused with the reason."""
    given = inputs.model is not None and is_vision_model(inputs.model)
    processor = load_processor(cfg.model, model_path) if model_path else None
    if processor is None and given:
        raise ConfigError("the vision-language model object has no name_or_path to load its processor from")
    if processor is not None and cfg.data.packing != "none":
        raise ConfigError(PACKING_REFUSAL)
    return processor


def _vision_tokens(tokens: RunTokens, processor: Any, cfg: SFTConfig, inputs: RunInputs) -> RunTokens:
    """A vision-language run tokenizes with its processor's tokenizer (the one its expansion uses)."""
    if inputs.tokenizer is not None or cfg.data.add_chatml_tokens:
        processor.tokenizer = tokens.tokenizer
        return tokens
    tokenizer = with_pad_token(processor.tokenizer)
    return RunTokens(tokens.model_path, tokenizer, len(tokenizer), tokens.adapter_dir)


def prepare_run_data(
    cfg: SFTConfig,
    console: Console | None = None,
    inputs: RunInputs | None = None,
    model_path: str | None = None,
) -> RunData:
    """Tokenizer, template, datasets and micro-batch units of a run; prints the data report when
    `console` is given (the main process). `inputs`: what the Python API passes (datasets, a formatting
    function, a model object or tokenizer); `model_path`: the base model's path if already resolved."""
    inputs = inputs or RunInputs()
    if not cfg.data.train and not inputs.train_sources:
        raise ConfigError(NO_TRAINING_DATA + " (in the Python API: train_dataset=)")
    cfg = with_resolved_length(cfg, inputs, model_path, console)
    tokens = load_run_tokens(cfg, inputs, model_path)
    processor = run_processor(cfg, tokens.model_path, inputs)
    if processor is not None:
        tokens = _vision_tokens(tokens, processor, cfg, inputs)
    tokenizer = tokens.tokenizer
    check_sequence_length(cfg, tokens.model_path, console)
    template = load_template(cfg.data, tokenizer)
    train, evals, report = build_datasets(
        cfg.data,
        tokenizer,
        cfg.train.seed,
        inputs.train_sources,
        inputs.eval_sources,
        template=template,
        formatting_func=inputs.formatting_func,
        processor=processor,
    )
    pad_id = tokenizer.pad_token_id
    units, collate, note = micro_batch_units(cfg, train, pad_id, processor)
    data = RunData(
        tokens.model_path,
        tokenizer,
        tokens.vocab_before,
        tokens.adapter_dir,
        template,
        train,
        evals,
        report,
        units,
        collate,
        note,
        {name: evals.select(pos) for name, pos in report.eval_sets.items()},
        processor,
    )
    if console is not None:
        print_data_report(data, console)
    return data


def micro_batch_units(
    cfg: SFTConfig, train: Any, pad_id: int, processor: Any
) -> tuple[Sequence[Any], Any, str]:
    """What a micro-batch is made of (examples, or packed rows of max_seq_length tokens), the collate
    function laying it out as tensors, and a note for the data report."""
    if processor is not None:  # images are loaded and processed per micro-batch
        units, note = train, ""
        collate = functools.partial(vision_collate, processor=processor, pad_id=pad_id)
    elif cfg.data.packing == "none":
        units: Sequence[Any] = train
        collate = functools.partial(pad_collate, pad_id=pad_id)
        note = ""
    else:  # micro_batch_size then counts packed rows of max_seq_length tokens
        units = pack_examples(train, cfg.data.packing, cfg.data.max_seq_length)
        collate = functools.partial(packed_collate, pad_id=pad_id)
        note = (
            f"; packed ({cfg.data.packing}) into {len(units)} rows of <= {cfg.data.max_seq_length} tokens, "
            f"efficiency {packing_efficiency(units, cfg.data.max_seq_length):.1%}"
        )
    return units, collate, note


def micro_batch_stream(cfg: SFTConfig, units: Sequence[Any], world_size: int) -> MicroBatchStream:
    """The run's micro-batches over its units, epoch after epoch: fixed-size ones (micro_batch_size units
    per process) or token budgets (micro_batch_tokens per process). The stream is global: each of its
    micro-batches holds every process's share, split among them by the loop."""
    if cfg.train.micro_batch_tokens is None:
        global_micro_batch_size = cfg.train.micro_batch_size * world_size
        return MicroBatchStream(len(units), global_micro_batch_size, cfg.train.seed)
    lengths = units.lengths.tolist() if hasattr(units, "lengths") else [len(u.input_ids) for u in units]
    global_micro_batch_tokens = cfg.train.micro_batch_tokens * world_size
    return MicroBatchStream(
        len(units), 0, cfg.train.seed, lengths=lengths, global_tokens=global_micro_batch_tokens
    )


def print_data_report(data: RunData, console: Console) -> None:
    first, *rest = data.report.summary().splitlines()
    console.print(f"[bold]data[/bold]: {escape(first)}{escape(data.packing_note)}", highlight=False)
    for line in rest:
        warn = line.lstrip().startswith("warning:")
        console.print(f"[yellow]{escape(line)}[/yellow]" if warn else escape(line), highlight=False)
    for line in data.report.bad_examples:
        console.print(f"  [yellow]skipped[/yellow] {escape(line)}", highlight=False)


def data_report_json(data: RunData) -> dict:
    """What the data phase found, for the run report (trainer/report.py)."""
    r = data.report
    return {
        "summary": r.summary() + data.packing_note,
        "rows": r.rows,
        "kept": r.kept,
        "bad": r.bad,
        "bad_reasons": dict(r.bad_reasons.most_common()),
        "bad_examples": r.bad_examples,
        "train_examples": r.train_examples,
        "eval_examples": r.eval_examples,
        "unknown_fields": r.unknown_fields,
        "unused_mapping": r.unused_mapping,
        "sources": r.sources_json(),
    }


def packing_summary(data: RunData, cfg: SFTConfig) -> str:
    if cfg.data.packing == "none":
        return (
            "packing: none: each example is one row, padded to the longest row of its micro-batch "
            "(data.packing: bfd packs whole examples into rows of max_seq_length)"
        )
    return f"packing: {data.packing_note.lstrip('; ')}"


def print_preview(data: RunData, cfg: SFTConfig, console: Console, n: int, plain: bool | None = None) -> None:
    """Per source: format(s), target share, lengths and `n` seeded sample examples with their targets
    marked (coloured on a terminal, else [[ ]]); then packing and the training set's length histogram."""
    if plain is None:  # colours only where they show: a terminal, colours not turned off (NO_COLOR)
        plain = not console.is_terminal or console.color_system is None
    r = data.report
    image_ids = image_token_ids(data.processor) if data.processor is not None else set()
    console.print(Text(preview.PLAIN_LEGEND if plain else preview.RICH_LEGEND, style="italic"))
    for k, (stats, source, examples) in enumerate(zip(r.sources, r.source_data, r.source_examples)):
        console.print(Text(f"\n== {stats.name}: {'; '.join(stats.details()[:1])}", style="bold"))
        for line in stats.details()[1:]:
            console.print(Text(f"   {line}", style="yellow"))
        picks = preview.sample(len(examples), n, cfg.train.seed + k)
        for j, i in enumerate(picks):
            ids, labels = examples.arrays(int(i))
            targets = int(np.count_nonzero(labels != IGNORE_INDEX))
            where = source.where_token(int(examples.start[i]))
            console.print(
                Text(
                    f"-- example {j + 1}/{len(picks)}: {where} ({len(ids)} tokens, {targets} targets)",
                    style="cyan",
                )
            )
            images = examples.images(int(i))
            runs = preview.decoded_runs(data.tokenizer, ids.tolist(), labels.tolist(), image_ids, images)
            if plain:  # written as is: rich would expand tabs and drop control characters
                console.file.write(preview.mark_plain(runs) + "\n")
            else:
                console.print(preview.styled(runs))
    lengths = data.train.lengths
    stats = ", ".join(f"{k} {v}" for k, v in length_stats(lengths).items())
    console.print(
        Text(
            f"\n== train: {len(data.train)} examples, {data.train.num_tokens:,} tokens; "
            f"lengths: {stats} tokens",
            style="bold",
        )
    )
    console.print(Text(packing_summary(data, cfg)))
    console.print(Text("length histogram (tokens per example -> examples):"))
    for line in preview.histogram(lengths):
        console.print(Text("  " + line))
