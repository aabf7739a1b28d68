"""The data section's schema: the row formats and the fields each reads, one data source
(`SourceConfig`), and the data section (`DataConfig`): sources, template, masks, lengths, packing,
preparation. Part of the run configuration's schema (config_schema.py holds the other sections and
re-exports these names; sftlab/config.py reads YAML and overrides into them).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Strict(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text", "pretokenized")
# The fields each row format reads (data/formats.py; docs/data.md), the first ones required; a source's
# `columns` renames its own fields onto these names.
ROW_FIELDS = {
    "messages": ("messages", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "prompt_completion": ("prompt", "completion", "tools"),
    "alpaca": ("instruction", "output", "input", "system", "tools"),
    "text": ("text", "loss_masking_spans"),
    "pretokenized": ("input_ids", "labels"),
}
REQUIRED_FIELDS = {"messages": 1, "sharegpt": 1, "prompt_completion": 2, "alpaca": 2, "text": 1, "pretokenized": 1}
MESSAGE_KEYS = ("role", "content")  # the keys of one message in `messages` (and in `prompt` / `completion` lists)
TURN_KEYS = ("from", "value")  # the keys of one ShareGPT turn in `conversations`
ROLES = ("system", "user", "assistant", "tool")


def _column_names(fmt: str) -> tuple[str, ...]:
    """The names `columns` may map for a source of format `fmt`."""
    if fmt == "auto":
        return tuple(dict.fromkeys(f for fields in ROW_FIELDS.values() for f in fields)) + MESSAGE_KEYS + TURN_KEYS
    inner = {"messages": MESSAGE_KEYS, "prompt_completion": MESSAGE_KEYS, "sharegpt": TURN_KEYS}.get(fmt, ())
    return ROW_FIELDS[fmt] + inner


class SourceConfig(Strict):
    """One data source."""

    path: str = Field(description=(
        "a local JSONL/JSON/Parquet/CSV file or directory, a `datasets.save_to_disk` directory, or a hub dataset "
        "name"))
    name: str | None = Field(None, description=(
        "a name for the source (reports); an eval source with a name also gets its own validation loss, "
        "`eval/<name>_loss` (sources of the same name together)"))
    format: Literal[FORMATS] = Field("auto", description=(  # type: ignore[valid-type]
        "row format; auto detects it per row from the keys"))
    weight: float | int | None = Field(None, gt=0, description=(
        "mixing: a float <= 1.0 takes that fraction of the source, an integer > 1 that many examples (repeating "
        "the source when it is smaller); null takes the source once"))
    split: str = Field("train", description="split of a hub dataset or DatasetDict directory")
    subset: str | None = Field(None, description="hub dataset configuration name")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "rename the source's own fields onto the format's, `{format_field: your_field}`: e.g. `{prompt: question, "
        "completion: answer}`; inside message lists `role`/`content` (messages, prompt/completion lists) and "
        "`from`/`value` (ShareGPT turns) are mapped the same way (docs/data.md)"))
    roles: dict[str, Literal[ROLES]] = Field(default_factory=dict, description=(  # type: ignore[valid-type]
        "rename role names of messages (`role`) and ShareGPT turns (`from`), `{your_role: role}`: e.g. "
        "`{human: user, bot: assistant}`; roles are system, user, assistant, tool"))
    response_template: str | None = Field(None, min_length=1, description=(
        "this source's own data.response_template (with its own instruction_template); null: the data section's"))
    instruction_template: str | None = Field(None, min_length=1, description=(
        "this source's own data.instruction_template; needs this source's response_template"))

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str], info: Any) -> dict[str, str]:
        return check_columns(columns, info.data.get("format", "auto"))

    @field_validator("instruction_template")
    @classmethod
    def _marker_pair(cls, instruction: str | None, info: Any) -> str | None:
        return check_markers(info.data.get("response_template"), instruction)


def check_markers(response: str | None, instruction: str | None) -> str | None:
    """An instruction template needs a response template, and differs from it."""
    if instruction is not None and response is None:
        raise ValueError("instruction_template needs a response_template (the marker after which text is trained)")
    if instruction is not None and instruction == response:
        raise ValueError(f"instruction_template and response_template are the same ({response!r}); they must differ")
    return instruction


def check_columns(columns: dict[str, str], fmt: str = "auto") -> dict[str, str]:
    """A `columns` mapping names fields of the format (or of any format for auto), each renamed once."""
    allowed = _column_names(fmt)
    for name, theirs in columns.items():
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            of = "any format" if fmt == "auto" else f"format {fmt}"
            raise ValueError(f"columns.{name}: not a field of {of} (those are: {', '.join(allowed)}){hint}")
        if not theirs:
            raise ValueError(f"columns.{name}: empty field name")
    for theirs in set(columns.values()):
        twice = [k for k, v in columns.items() if v == theirs]
        if len(twice) > 1 and not set(twice) <= set(MESSAGE_KEYS + TURN_KEYS):
            raise ValueError(f"columns: {theirs!r} is mapped to {' and '.join(twice)}; a field can be renamed once")
    return columns


def sources_shorthand(value: Any) -> Any:
    """`x.jsonl` -> `[{path: x.jsonl}]`; a list's bare paths -> `{path: ...}` (anything else unchanged)."""
    if isinstance(value, str):
        return [{"path": value}]
    if isinstance(value, list):
        return [{"path": v} if isinstance(v, str) else v for v in value]
    return value


class DataConfig(Strict):
    """Training and validation data: sources, template, masks, lengths, packing, preparation."""

    train: list[SourceConfig] = Field(default_factory=list, description=(
        "training sources (at least one); a bare path (or list of paths) is a source with every default"))
    eval: list[SourceConfig] = Field(default_factory=list, description=(
        "validation sources; when empty, eval_fraction of the mixed training examples is held out"))

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _path_shorthand(cls, v: Any) -> Any:
        return sources_shorthand(v)

    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "fraction of training examples held out for validation (0 with no eval sources: no validation loss)"))
    max_seq_length: int = Field(2048, gt=0, description="longest example (and packed row) in tokens")
    on_overlength: Literal["drop", "truncate", "error"] = Field("drop", description=(
        "what happens to an example longer than max_seq_length (every case is counted in the data report)"))
    loss_on: Literal["assistant", "last_assistant", "completion", "all"] = Field("assistant", description=(
        "which tokens of chat rows carry loss: assistant: every assistant turn (content + its end-of-turn token); "
        "last_assistant: only the last assistant turn; completion: the same as last_assistant, but a row that does "
        "not end with an assistant message is bad (for prompt/completion rows: the final assistant message of the "
        "completion); all: every token. Text and pretokenized rows keep their own masks (docs/data.md)"))
    response_template: str | None = Field(None, min_length=1, description=(
        "text rows: only the text after this marker carries loss (TRL's completion-only response_template, found "
        "by string search on the text, so it never depends on how the marker tokenizes); a text without it is a "
        "bad row; the marker itself is not trained (docs/data.md)"))
    instruction_template: str | None = Field(None, min_length=1, description=(
        "text rows, with response_template (multi-turn): the loss covers the text after each response marker up "
        "to the next instruction marker; an instruction marker with no response marker after it makes a bad row"))

    @field_validator("instruction_template")
    @classmethod
    def _marker_pair(cls, instruction: str | None, info: Any) -> str | None:
        return check_markers(info.data.get("response_template"), instruction)

    chat_template: str | None = Field(None, description=(
        "null: the tokenizer's own; a built-in name (chatml, llama3, tulu, zephyr, alpaca; with tools: chatml_tools, "
        "llama3_tools); or a .jinja file"))
    tools: Literal["error", "drop"] = Field("error", description=(
        "rows with tool schemas (`tools`), assistant `tool_calls` or tool results that the chat template does not "
        "render: error: stop before training, naming the row (use a tool template, e.g. chat_template: "
        "chatml_tools); drop: train without them (one warning counts the rows)"))
    add_bos: bool = Field(False, description=(
        "start every chat example with the tokenizer's BOS token (no loss on it) when the template writes none "
        "(e.g. ChatML on a model pretrained with a BOS); text rows get the tokenizer's own special tokens"))
    pad_vocab_to_multiple_of: int | None = Field(None, gt=0, description=(
        "when tokens are added (add_chatml_tokens), round the embedding rows up to a multiple of this (64 or "
        "128 suits GPU kernels); the extra rows are never produced by the tokenizer"))
    add_chatml_tokens: bool = Field(False, description=(
        "add <|im_start|>/<|im_end|> as special tokens and grow the embeddings (for the chatml template on a base "
        "model)"))
    packing: Literal["none", "wrapped", "bfd"] = Field("none", description=(
        "none: one example per row; bfd: whole documents packed best-fit-decreasing into rows of max_seq_length; "
        "wrapped: concatenated and cut (documents may split). Packed documents never attend to each other"))
    eval_packing: bool = Field(False, description=(
        "pack the eval sets too (best-fit rows of max_seq_length, never wrapped, so no document is cut): fewer, "
        "fuller forwards; the loss equals unpacked eval up to float rounding (TRL's eval_packing)"))
    num_proc: int = Field(1, gt=0, description="tokenization worker processes")
    cache: bool = Field(True, description=(
        "keep tokenized data on disk (memory-mapped arrays), keyed by content + tokenizer + template + code"))
    cache_dir: str | None = Field(None, description="where the data cache lives (default $SFTLAB_CACHE/data, ~/.cache/sftlab/data)")
    on_bad_record: Literal["skip", "error"] = Field("skip", description=(
        "skip: report bad rows (file:line, field, reason) and go on; error: stop at the first"))
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0, description="skip mode still fails when more rows than this are bad")
