"""The data phase of a run, shared by `sftlab train` and `sftlab prepare`.

`prepare_run_data(cfg, console)`: resolve the model path, load the tokenizer (with ChatML tokens
when asked), resolve the chat template ONCE, build the train/eval sets (`data.build_datasets`:
read, normalise, tokenize, mask, cache, length policy, mix, eval split), pack them when
`data.packing` is set, and print the data report. `data.max_seq_length` above the model's
`max_position_embeddings` fails first (a warning when the model configures rope scaling). What training needs next (the model path, the
tokenizer's size before new tokens, the units a micro-batch is made of and how to collate them)
travels in `RunData`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from transformers import PreTrainedTokenizerBase

from sftlab.config import ConfigError, SFTConfig
from sftlab.data.collate import pad_collate
from sftlab.data.dataset import DataReport, build_datasets
from sftlab.data.packing import pack_examples, packed_collate, packing_efficiency
from sftlab.data.templates import add_chatml_tokens, load_template
from sftlab.data.examples import Examples
from sftlab.model.loading import load_tokenizer, position_limit, resolve_model_path


@dataclass
class RunData:
    model_path: str
    tokenizer: PreTrainedTokenizerBase
    vocab_before: int  # len(tokenizer) before ChatML tokens were added: the model is resized to match
    template: str | None  # the chat template text (None: no chat rows, no template)
    train: Examples  # memory-mapped token arrays, indexed
    eval: Examples
    report: DataReport
    units: Sequence[Any]  # what a micro-batch is made of: examples, or packed rows (built when indexed)
    collate: Callable[[list[Any]], dict]
    packing_note: str = ""

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def load_run_tokenizer(cfg: SFTConfig) -> tuple[str, PreTrainedTokenizerBase, int]:
    """(model path, tokenizer, its size before ChatML tokens were added)."""
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    vocab_before = len(tokenizer)
    if cfg.data.add_chatml_tokens:
        add_chatml_tokens(tokenizer)
    return model_path, tokenizer, vocab_before


def check_sequence_length(cfg: SFTConfig, model_path: str, console: Console | None) -> None:
    """max_seq_length must fit the model's positions (beyond them it was never trained), unless rope
    scaling is configured, which extends them: then a warning."""
    limit, scaling = position_limit(cfg.model, model_path)
    length = cfg.data.max_seq_length
    if limit is None or length <= limit:
        return
    if scaling is None:
        raise ConfigError(f"data.max_seq_length ({length}) is above the model's max_position_embeddings ({limit}, "
                          f"{model_path}): set data.max_seq_length to {limit} or less")
    if console is not None:
        console.print(f"[bold yellow]warning[/bold yellow]: data.max_seq_length ({length}) is above the model's "
                      f"max_position_embeddings ({limit}); its rope scaling ({scaling}) must cover it", highlight=False)


def prepare_run_data(cfg: SFTConfig, console: Console | None = None) -> RunData:
    """Tokenizer, template, datasets and micro-batch units of a run; prints the data report when
    `console` is given (the main process)."""
    model_path, tokenizer, vocab_before = load_run_tokenizer(cfg)
    check_sequence_length(cfg, model_path, console)
    template = load_template(cfg.data, tokenizer)
    train, evals, report = build_datasets(cfg.data, tokenizer, cfg.train.seed, template=template)
    pad_id = tokenizer.pad_token_id
    if cfg.data.packing == "none":
        units: Sequence[Any] = train
        collate = functools.partial(pad_collate, pad_id=pad_id)
        note = ""
    else:  # micro_batch_size then counts packed rows of max_seq_length tokens
        units = pack_examples(train, cfg.data.packing, cfg.data.max_seq_length)
        collate = functools.partial(packed_collate, pad_id=pad_id)
        note = (f"; packed ({cfg.data.packing}) into {len(units)} rows of <= {cfg.data.max_seq_length} tokens, "
                f"efficiency {packing_efficiency(units, cfg.data.max_seq_length):.1%}")
    data = RunData(model_path, tokenizer, vocab_before, template, train, evals, report, units, collate, note)
    if console is not None:
        print_data_report(data, console)
    return data


def print_data_report(data: RunData, console: Console) -> None:
    console.print(f"[bold]data[/bold]: {escape(data.report.summary())}{data.packing_note}", highlight=False)
    for line in data.report.bad_examples:
        console.print(f"  [yellow]skipped[/yellow] {escape(line)}", highlight=False)


def data_report_json(data: RunData) -> dict:
    """What the data phase found, for the run report (train/report.py)."""
    r = data.report
    return {"summary": r.summary() + data.packing_note, "rows": r.rows, "kept": r.kept, "bad": r.bad,
            "bad_reasons": dict(r.bad_reasons.most_common()), "bad_examples": r.bad_examples,
            "train_examples": r.train_examples, "eval_examples": r.eval_examples}
