"""Typed run configuration: one YAML file maps 1:1 onto these pydantic models.

`load_config(path, overrides)` reads the YAML, applies dotted CLI overrides
(`optim.lr=1e-5`, `data.train.0.path=x.jsonl`), and validates. Unknown or mistyped keys
are rejected with their dotted path. With no path, the packaged demo config is used, unless the
overrides give the training data (`data.train=FILE`): then the library defaults are (the quick start).
A source may be written as its path alone: `data.train: x.jsonl` (or a list of paths) is
`data.train: [{path: x.jsonl}]`.
"""

from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEMO_CONFIG = Path(__file__).parent / "demo" / "demo.yaml"


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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override '{dotted}': '{where}' is not a valid list index")
            node = node[int(part)]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{dotted}': '{where}' is a value, not a section")
        node = child
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override '{dotted}': '{last}' is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars (1e-5, true, null, [1, 2])."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. optim.lr=1e-5")
        value = yaml.safe_load(raw) if raw.strip() else None
        # YAML reads '1e-5' as a string (no dot in the mantissa); numbers are what people mean.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in "eE.") else value
            except ValueError:
                pass
        _set_dotted(tree, key.strip(), value)
        _normalise_sources(tree)
    return tree


def _normalise_sources(tree: dict[str, Any]) -> None:
    """Sources given as bare paths become `{path: ...}` mappings (so paths resolve and `.0.x` overrides apply)."""
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            if key in data:
                data[key] = sources_shorthand(data[key])


def gives_training_data(overrides: list[str] | None) -> bool:
    """Whether the overrides set the whole training data (`data.train=...`), not a key inside it."""
    return any(item.partition("=")[0].strip() == "data.train" for item in overrides or [])


# Names other tools use for our keys (TRL/transformers, axolotl, torchtune): suggested for an unknown key.
ALIASES = {
    "learning_rate": "lr", "lr_scheduler_type": "scheduler", "lr_scheduler": "scheduler",
    "per_device_train_batch_size": "micro_batch_size", "batch_size": "micro_batch_size",
    "micro_batch": "micro_batch_size", "gradient_accumulation_steps": "grad_accum_steps",
    "gradient_accumulation": "grad_accum_steps", "num_train_epochs": "num_epochs", "epochs": "num_epochs",
    "max_length": "max_seq_length", "max_seq_len": "max_seq_length", "sequence_len": "max_seq_length",
    "seq_len": "max_seq_length", "warmup": "warmup_ratio", "lora_r": "r", "lora_alpha": "alpha",
    "lora_dropout": "dropout", "lora_target_modules": "target_modules", "bf16": "mixed_precision",
    "fp16": "mixed_precision", "precision": "mixed_precision", "max_grad_norm_clip": "max_grad_norm",
    "gradient_clipping": "max_grad_norm", "save_steps": "every_steps", "save_total_limit": "keep_last",
    "eval_steps": "eval_every", "logging_steps": "log_every", "dataset": "train", "datasets": "train",
    "val_set_size": "eval_fraction", "sample_packing": "packing", "model_name_or_path": "name_or_path",
    "base_model": "name_or_path", "output": "output_dir", "neftune_noise_alpha": "neftune_alpha",
    "resume_from_checkpoint": "resume", "dataset_num_proc": "num_proc", "torch_dtype": "dtype",
}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config class inside an annotation (X, X | None, list[X]), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config class that holds the key at `loc` (list indices skipped)."""
    model: type[BaseModel] | None = SFTConfig
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
    return model


def config_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:  # type: ignore[assignment]
    """Every dotted key of the config (lists of sources as `data.train.N.path`)."""
    model = model or SFTConfig
    keys = []
    for name, field in model.model_fields.items():
        inner = _model_of(field.annotation)
        is_list = getattr(field.annotation, "__origin__", None) is list
        sub = f"{prefix}{name}." + ("N." if is_list else "")
        keys += config_keys(inner, sub) if inner is not None else [f"{prefix}{name}"]
    return keys


def suggest_key(loc: tuple) -> str | None:
    """A did-you-mean for the unknown key at `loc`: a close name in the same section, else a known
    alias (e.g. learning_rate -> optim.lr), anywhere in the config."""
    name = str(loc[-1])
    holder = _model_at(loc[:-1])
    prefix = ".".join(str(p) for p in loc[:-1])
    here = list(holder.model_fields) if holder is not None else []
    target = ALIASES.get(name.lower())
    if target in here:
        return f"{prefix}.{target}" if prefix else target
    close = difflib.get_close_matches(name, here, n=1, cutoff=0.6)
    if close:
        return f"{prefix}.{close[0]}" if prefix else close[0]
    wanted = target or name
    anywhere = [k for k in config_keys() if k.rsplit(".", 1)[-1] == wanted]
    if not anywhere:
        anywhere = difflib.get_close_matches(name, config_keys(), n=1, cutoff=0.75)
    return anywhere[0] if anywhere else None


def _suggest_value(e: dict) -> str:
    expected = re.findall(r"'([^']*)'", str((e.get("ctx") or {}).get("expected", "")))
    close = difflib.get_close_matches(str(e.get("input")), expected, n=1, cutoff=0.4)
    return f"; did you mean {close[0]!r}?" if close else ""


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            hint = suggest_key(e["loc"])
            lines.append(f"  {loc}: unknown key" + (f"; did you mean {hint}?" if hint else ""))
            continue
        hint = _suggest_value(e) if e["type"] == "literal_error" else ""
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r}){hint}")
    return "\n".join(lines)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return tree


def _resolve_paths(tree: dict[str, Any], base: Path) -> None:
    """Paths written in a config file (data sources, .jinja template, model dir, match_eval file) that
    exist relative to that file are taken relative to it; others stay relative to the working directory
    (output_dir and cache_dir always are)."""
    data = tree.get("data")
    if isinstance(data, dict):
        for key in ("train", "eval"):
            for src in data.get(key) or []:
                if isinstance(src, dict) and isinstance(src.get("path"), str):
                    p = Path(src["path"]).expanduser()
                    if not p.is_absolute() and (base / p).exists():
                        src["path"] = str(base / p)
    if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
        p = Path(data["chat_template"]).expanduser()
        if p.suffix == ".jinja" and not p.is_absolute() and (base / p).exists():
            data["chat_template"] = str(base / p)
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("name_or_path"), str):
        p = Path(model["name_or_path"]).expanduser()
        if model["name_or_path"] != "default" and not p.is_absolute() and (base / p).exists():
            model["name_or_path"] = str(base / p)
    me = tree.get("match_eval")
    if isinstance(me, dict) and isinstance(me.get("path"), str):
        p = Path(me["path"]).expanduser()
        if not p.is_absolute() and (base / p).exists():
            me["path"] = str(base / p)


NO_TRAINING_DATA = "data.train: at least one training source is required"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                require_data: bool = True) -> SFTConfig:
    """Read a YAML config, apply overrides, validate. With no `path`: the packaged demo config, or the
    library defaults when the overrides give the training data (`data.train=FILE`). `require_data`:
    data.train must name a source (a run's own config.yaml may not: the Python API passes datasets)."""
    if path is None and gives_training_data(overrides):
        tree: dict[str, Any] = {}
        source = "the library defaults + overrides"
    else:
        cfg_path = Path(path) if path is not None else DEMO_CONFIG
        tree = _read_yaml(cfg_path)
        _normalise_sources(tree)
        _resolve_paths(tree, cfg_path.resolve().parent)
        source = str(cfg_path)
    apply_overrides(tree, overrides or [])
    try:
        cfg = SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None
    if require_data and not cfg.data.train:
        raise ConfigError(f"{source}: {NO_TRAINING_DATA}")
    return cfg


def resolve_config(config: str | Path | dict | SFTConfig | None = None,
                   values: dict[str, Any] | None = None) -> SFTConfig:
    """The config of a Python API call: `config` (a YAML path, a dict tree, an SFTConfig, or None for the
    library defaults) with `values` set on it -- dotted keys (`{"optim.lr": 1e-5}`) or whole sections
    (`{"optim": {"lr": 1e-5}}`, merged), as Python values (not parsed as YAML). A mistyped key gets the
    same did-you-mean as in a YAML file (`learning_rate` -> optim.lr)."""
    if isinstance(config, (str, Path)):
        tree = load_config(config, require_data=False).model_dump(mode="python")
        source = str(config)
    elif isinstance(config, SFTConfig):
        tree, source = config.model_dump(mode="python"), "the SFTConfig given"
    elif isinstance(config, dict):
        tree, source = copy.deepcopy(config), "the config dict given"
    elif config is None:
        tree, source = {}, "the library defaults"
    else:
        raise ConfigError(f"config: expected a YAML path, a dict or an SFTConfig, got {type(config).__name__}")
    for key, value in (values or {}).items():
        if "." not in key and isinstance(value, dict) and key in SFTConfig.model_fields:
            if not isinstance(tree.get(key), dict):
                tree[key] = {}
            _merge_tree(tree[key], value)
        elif "." not in key and key not in SFTConfig.model_fields:
            hint = suggest_key((key,))
            raise ConfigError(f"{key}: unknown key" + (f"; did you mean {hint}?" if hint else "")
                              + " (keyword arguments are config keys: dotted, e.g. **{'optim.lr': 1e-5}, or sections)")
        else:
            _set_dotted(tree, key, value)
        _normalise_sources(tree)
    try:
        return SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source + (" + keyword arguments" if values else ""))) from None


def _merge_tree(into: dict[str, Any], values: dict[str, Any]) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge_tree(into[k], v)
        else:
            into[k] = v


def _type_name(annotation: Any) -> str:
    args = getattr(annotation, "__args__", None)
    origin = getattr(annotation, "__origin__", None)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    if args:  # a union
        return " \\| ".join("`null`" if a is type(None) else _type_name(a) for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return f"`{getattr(annotation, '__name__', annotation)}`"


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def config_reference() -> str:
    """Every config key with its type, default and description, as Markdown (docs/config.md)."""
    out = ["# Configuration reference", "",
           "Generated by `sftlab config reference` from the typed config (src/sftlab/config.py); a test",
           "fails when this file is stale. One YAML file maps onto these sections; any key can be overridden",
           "on the command line as `section.key=value` (e.g. `optim.lr=1e-5`, `data.train.0.path=x.jsonl`).", ""]
    sections = [(name, _model_of(f.annotation), f) for name, f in SFTConfig.model_fields.items()]
    for name, model, field in sections:
        optional = " Optional: absent or `null` turns it off." if not field.is_required() and field.default is None else ""
        out += [f"## `{name}`", "", f"{model.__doc__ or field.description}{optional}", ""]
        out += _reference_table(model, name)
        if model is DataConfig:
            out += ["### `data.train.N` / `data.eval.N` (each source)", "", SourceConfig.__doc__ or "", ""]
            out += _reference_table(SourceConfig, "data.train.N")
    return "\n".join(out)


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|")


def _reference_table(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _model_of(field.annotation) is SourceConfig:
            rows.append(f"| `{prefix}.{name}` | list of sources | `[]` | {_cell(field.description)} (see below) |")
            continue
        rows.append(f"| `{prefix}.{name}` | {_type_name(field.annotation)} | {_default(field)} | {_cell(field.description)} |")
    return rows + [""]


def dump_config(cfg: SFTConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
