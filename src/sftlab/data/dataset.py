"""Build tokenized, masked train/validation sets from the configured sources.

Reads every source, normalises rows to conversations, tokenizes and labels them, applies the
length policy, and counts what was skipped and why. Nothing is dropped or truncated silently:
every decision lands in `DataReport`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from sftlab.config import DataConfig, SourceConfig
from sftlab.data.formats import BadRecord, Conversation, iter_jsonl, to_conversation
from sftlab.data.masking import TemplateError, TokenizedExample, tokenize_conversation


class DataError(ValueError):
    """The data cannot be used; the message names the source and what is wrong."""


@dataclass
class DataReport:
    rows: int = 0
    kept: int = 0
    bad: int = 0
    bad_reasons: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    overlength_dropped: int = 0
    overlength_truncated: int = 0
    no_target_after_truncation: int = 0

    def add_bad(self, err: BadRecord | TemplateError | DataError, max_examples: int = 5) -> None:
        self.bad += 1
        self.bad_reasons[getattr(err, "reason", str(err))] += 1
        if len(self.bad_examples) < max_examples:
            self.bad_examples.append(str(err))

    def summary(self) -> str:
        parts = [f"{self.kept} examples kept of {self.rows} rows"]
        if self.bad:
            parts.append(f"{self.bad} bad rows skipped ({dict(self.bad_reasons.most_common(5))})")
        if self.overlength_dropped:
            parts.append(f"{self.overlength_dropped} over max_seq_length dropped")
        if self.overlength_truncated:
            parts.append(f"{self.overlength_truncated} truncated to max_seq_length")
        if self.no_target_after_truncation:
            parts.append(f"{self.no_target_after_truncation} dropped: no target token left after truncation")
        return "; ".join(parts)


def read_conversations(src: SourceConfig, report: DataReport, on_bad: str) -> list[Conversation]:
    path = Path(src.path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl")
        if not files:
            raise DataError(f"data source {path}: directory has no .jsonl files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"data source not found: {path}")
    out: list[Conversation] = []
    for file in files:
        for lineno, row in iter_jsonl(file):
            report.rows += 1
            try:
                if isinstance(row, BadRecord):
                    raise row
                out.append(to_conversation(row, src.format, str(file), lineno))
            except BadRecord as e:
                if on_bad == "error":
                    raise DataError(str(e)) from None
                report.add_bad(e)
    return out


def tokenize_all(convs: list[Conversation], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                 report: DataReport, template: str | None) -> list[TokenizedExample]:
    out = []
    for conv in convs:
        try:
            ex = tokenize_conversation(tokenizer, conv.messages, cfg.loss_on, template, conv.tools)
        except TemplateError as e:
            err = BadRecord(conv.source, conv.line, "messages", str(e))
            if cfg.on_bad_record == "error":
                raise DataError(str(err)) from None
            report.add_bad(err)
            continue
        ex = apply_length_policy(ex, cfg, report, f"{conv.source}:{conv.line}")
        if ex is not None:
            out.append(ex)
    return out


def apply_length_policy(ex: TokenizedExample, cfg: DataConfig, report: DataReport,
                        where: str) -> TokenizedExample | None:
    n = len(ex.input_ids)
    if n <= cfg.max_seq_length:
        return ex
    if cfg.on_overlength == "error":
        raise DataError(f"{where}: {n} tokens exceed data.max_seq_length={cfg.max_seq_length} "
                        "(set data.on_overlength to drop or truncate)")
    if cfg.on_overlength == "drop":
        report.overlength_dropped += 1
        return None
    cut = TokenizedExample(ex.input_ids[: cfg.max_seq_length], ex.labels[: cfg.max_seq_length])
    if cut.num_targets == 0:
        report.no_target_after_truncation += 1
        return None
    report.overlength_truncated += 1
    return cut


def load_template(cfg: DataConfig) -> str | None:
    if cfg.chat_template is None:
        return None
    path = Path(cfg.chat_template)
    if not path.is_file():
        raise DataError(f"data.chat_template: file not found: {path}")
    return path.read_text(encoding="utf-8")


def build_datasets(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int
                   ) -> tuple[list[TokenizedExample], list[TokenizedExample], DataReport]:
    """Return (train, eval, report). Eval comes from data.eval sources or a seeded held-out fraction."""
    report = DataReport()
    template = load_template(cfg)
    train_convs = [c for src in cfg.train for c in read_conversations(src, report, cfg.on_bad_record)]
    eval_convs = [c for src in cfg.eval for c in read_conversations(src, report, cfg.on_bad_record)]
    if report.rows and report.bad / report.rows > cfg.max_bad_fraction:
        raise DataError(
            f"{report.bad} of {report.rows} rows are bad (> data.max_bad_fraction={cfg.max_bad_fraction}); "
            "first problems:\n  " + "\n  ".join(report.bad_examples)
        )
    if not eval_convs and cfg.eval_fraction > 0:
        order = list(range(len(train_convs)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(order) * cfg.eval_fraction))
        held = set(order[:n_eval])
        eval_convs = [c for i, c in enumerate(train_convs) if i in held]
        train_convs = [c for i, c in enumerate(train_convs) if i not in held]
    train = tokenize_all(train_convs, tokenizer, cfg, report, template)
    evals = tokenize_all(eval_convs, tokenizer, cfg, report, template)
    report.kept = len(train) + len(evals)
    if not train:
        raise DataError("no usable training examples: " + report.summary()
                        + ("\n  " + "\n  ".join(report.bad_examples) if report.bad_examples else ""))
    return train, evals, report
