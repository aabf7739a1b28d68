"""The run configuration's schema: one pydantic model per YAML section (`SFTConfig` holds them).

Every key has a type, a default and a description (`sftlab config reference` prints them, docs/config.md
is that output). Reading a YAML file, dotted overrides, the Python API's keyword arguments and the
did-you-mean suggestions for mistyped keys are in sftlab/config.py, which re-exports these names.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, with the dotted key path in its message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The model to fine-tune and how it is loaded."""

    name_or_path: str = Field("default", description=(
        "`default` (the embedded SmolLM2-135M-Instruct GGUF), a local Hugging Face model directory, a .gguf "
        "file, or a hub id"))
    gguf_file: str | None = Field(None, description="file name inside name_or_path when it is a directory holding GGUFs")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "the dtype the weights are stored and saved in; bfloat16 keeps fp32 master weights in the optimizer, "
        "so small updates are not lost to bf16 rounding"))
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description=(
        "attention kernel; flash_attention_2 needs CUDA and flash-attn (packed rows then run as varlen attention)"))
    trust_remote_code: bool = Field(False, description="run model code shipped with a hub model (off unless you trust it)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    freeze: list[Literal["vision", "projector", "language"]] = Field(["vision"], description=(
        "parts of a vision-language model kept frozen in full fine-tuning: vision (the vision tower), projector "
        "(the multimodal projector), language (the language model and its head); ignored for text-only models"))


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


class SourceConfig(_Strict):
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

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str], info: Any) -> dict[str, str]:
        return check_columns(columns, info.data.get("format", "auto"))


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


class DataConfig(_Strict):
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
    chat_template: str | None = Field(None, description=(
        "null: the tokenizer's own; a built-in name (chatml, llama3, tulu, zephyr, alpaca); or a .jinja file"))
    add_chatml_tokens: bool = Field(False, description=(
        "add <|im_start|>/<|im_end|> as special tokens and grow the embeddings (for the chatml template on a base "
        "model)"))
    packing: Literal["none", "wrapped", "bfd"] = Field("none", description=(
        "none: one example per row; bfd: whole documents packed best-fit-decreasing into rows of max_seq_length; "
        "wrapped: concatenated and cut (documents may split). Packed documents never attend to each other"))
    num_proc: int = Field(1, gt=0, description="tokenization worker processes")
    cache: bool = Field(True, description=(
        "keep tokenized data on disk (memory-mapped arrays), keyed by content + tokenizer + template + code"))
    cache_dir: str | None = Field(None, description="where the data cache lives (default $SFTLAB_CACHE/data, ~/.cache/sftlab/data)")
    on_bad_record: Literal["skip", "error"] = Field("skip", description=(
        "skip: report bad rows (file:line, field, reason) and go on; error: stop at the first"))
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0, description="skip mode still fails when more rows than this are bad")


class OptimConfig(_Strict):
    """AdamW and the learning-rate schedule."""

    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (never on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, description="AdamW epsilon")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping norm; null disables clipping (the norm is still logged)")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warmup")
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0, description=(
        "warmup as a fraction of the optimizer steps (rounded up); see warmup_steps"))
    warmup_steps: int | None = Field(None, ge=0, description=(
        "warmup in optimizer steps, overrides warmup_ratio: W warmup steps run at lr*1/(W+1) .. lr*W/(W+1) (no step "
        "at lr 0), step W+1 at the peak lr, then the decay; the last step's lr is above 0 (linear: lr/(steps-W))"))


class TrainConfig(_Strict):
    """The training loop: batch geometry, length, precision, speed, resume, logging."""

    output_dir: str = Field("runs/sft", description=(
        "where the model, metrics, report and checkpoints go; a non-empty one is refused unless resuming or "
        "overwrite is set"))
    overwrite: bool = Field(False, description=(
        "allow an output_dir that already holds a run (its model, checkpoints and marker are removed first) or "
        "other files; train.resume takes precedence"))
    micro_batch_size: int = Field(8, gt=0, description="examples (or packed rows) per micro-batch per process")
    micro_batch_tokens: int | None = Field(None, gt=0, description=(
        "a token budget per micro-batch instead of a row count (padding included); overrides micro_batch_size"))
    grad_accum_steps: int = Field(1, gt=0, description=(
        "micro-batches per optimizer step; the loss is normalised over all target tokens of the step"))
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides num_epochs when set")
    num_epochs: float = Field(1.0, gt=0, description="passes over the training data")
    seed: int = Field(42, description="seed of data order, mixing, eval split and initialisation")
    log_every: int = Field(1, gt=0, description="log a metrics line every N optimizer steps")
    eval_every: int | None = Field(None, gt=0, description="validation loss every N steps; null: only at the end")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms")
    gradient_checkpointing: bool = Field(True, description=(
        "recompute activations in the backward: half the memory, measured free on a 2-core AMX CPU; on GPUs "
        "typically 20-30% slower"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field("auto", description=(
        "auto: bf16 where the device runs it fast (CUDA with bf16; a CPU with AMX or AVX512-BF16), else fp32; "
        "bf16/fp16 keep fp32 master weights"))

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` as false

    loss_head: Literal["target", "full"] = Field("target", description=(
        "target: output projection and cross-entropy only where the next token is a target, in chunks (no full "
        "logits tensor); full: the model's own logits everywhere"))
    loss_chunk_tokens: int = Field(1024, gt=0, description="rows per chunk of the target-only loss head")
    compile: bool = Field(False, description="torch.compile the model")
    liger: bool = Field(False, description="Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); CUDA + liger-kernel")
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s for MFU; null: measured at start")
    resume: str | None = Field(None, description=(
        "auto: continue from the latest complete checkpoint in output_dir (else start fresh); a path: that "
        "checkpoint; null: start fresh"))
    on_nan: Literal["stop", "skip_step"] = Field("stop", description="what a non-finite loss or gradient does")
    neftune_alpha: float | None = Field(None, gt=0, description=(
        "NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on the input embeddings, training forwards "
        "only (typical: 5)"))
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(default_factory=list, description=(
        "experiment trackers besides metrics.jsonl (offline: tensorboard event files, wandb offline mode without "
        "an API key, trackio local)"))


class PeftSettings(_Strict):
    """LoRA / DoRA adapters through peft; the whole section absent (null) = full fine-tuning."""

    method: Literal["lora", "dora"] = Field("lora", description="adapter kind")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "all-linear: every linear layer but the output head; else module names, e.g. [q_proj, v_proj]"))
    modules_to_save: list[str] | None = Field(None, description=(
        "modules trained in full beside the adapters; embeddings and head are added when add_chatml_tokens grows "
        "the vocabulary"))
    quantize: Literal["nf4", "int8"] | None = Field(None, description=(
        "QLoRA: base weights quantized through bitsandbytes (pip install 'sftlab[qlora]')"))
    merge_on_save: bool = Field(False, description="also save the merged plain model under output_dir/merged")


class CheckpointConfig(_Strict):
    """Periodic checkpoints for exact resume."""

    every_steps: int | None = Field(None, gt=0, description="checkpoint every N optimizer steps")
    every_epoch: bool = Field(False, description="checkpoint at every epoch boundary")
    keep_last: int | None = Field(None, gt=0, description="rotation: keep this many; the newest complete one is never deleted")


class MatchEvalConfig(_Strict):
    """Exact-match accuracy of greedy generations against the reference last assistant turn."""

    path: str = Field(description="conversations whose last message is the reference assistant reply")
    max_examples: int | None = Field(None, gt=0, description="evaluate only the first N")
    max_new_tokens: int = Field(32, gt=0, description="generation budget per reply")
    batch_size: int = Field(32, gt=0, description="generation batch size")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "rename the file's own fields onto the format's, as a data source's `columns` (docs/data.md)"))
    roles: dict[str, Literal[ROLES]] = Field(default_factory=dict, description=(  # type: ignore[valid-type]
        "rename role names, as a data source's `roles`"))

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str]) -> dict[str, str]:
        return check_columns(columns)


class SFTConfig(_Strict):
    """A run: one YAML file, one section per class."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="the model")
    data: DataConfig = Field(default_factory=DataConfig, description="the data")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="the optimizer")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the training loop")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints")
    peft: PeftSettings | None = Field(None, description="LoRA/DoRA/QLoRA adapters; null: full fine-tuning")
    match_eval: MatchEvalConfig | None = Field(None, description="exact-match evaluation before and after training")

    @model_validator(mode="after")
    def _check_across_sections(self) -> "SFTConfig":
        budget = self.train.micro_batch_tokens
        if budget is not None and budget < self.data.max_seq_length:
            raise ValueError(f"train.micro_batch_tokens ({budget}) must be at least data.max_seq_length "
                             f"({self.data.max_seq_length}): a micro-batch must hold the longest row")
        return self
