"""Typed run configuration: one YAML file maps 1:1 onto these pydantic models.

`load_config(path, overrides)` reads the YAML, applies dotted CLI overrides
(`optim.lr=1e-5`, `data.train.0.path=x.jsonl`), and validates. Unknown or mistyped keys
are rejected with their dotted path. With no path, the packaged demo config is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEMO_CONFIG = Path(__file__).parent / "demo" / "demo.yaml"


class ConfigError(ValueError):
    """A configuration problem, with the dotted key path in its message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    # "default" is the embedded SmolLM2-135M-Instruct GGUF; else a local HF dir, a .gguf file, or a hub id.
    name_or_path: str = "default"
    gguf_file: str | None = None  # file name inside name_or_path when it is a directory holding GGUFs
    # The dtype the weights are stored (and saved) in. bfloat16: the optimizer keeps fp32 master weights,
    # so small updates are not lost to bf16 rounding (train/precision.py).
    dtype: Literal["float32", "bfloat16"] = "float32"
    # flash_attention_2: CUDA with the flash-attn package; packed rows then run as varlen attention
    # (transformers derives the document boundaries from the restarting position_ids)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    revision: str | None = None


FORMATS = ("auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text", "pretokenized")


class SourceConfig(_Strict):
    # A local JSONL/JSON/Parquet/CSV file or directory, a `datasets.save_to_disk` directory, or a hub dataset name.
    path: str
    format: Literal[FORMATS] = "auto"  # type: ignore[valid-type]
    # Mixing: a float <= 1.0 takes that fraction of the source, an integer > 1 that many examples
    # (repeating the source when it is smaller). None takes the source once.
    weight: float | int | None = Field(None, gt=0)
    split: str = "train"  # for hub datasets and DatasetDict directories
    subset: str | None = None  # hub dataset configuration name


class DataConfig(_Strict):
    train: list[SourceConfig] = Field(default_factory=list)
    # Validation: separate sources, or a fraction held out from the training rows.
    eval: list[SourceConfig] = Field(default_factory=list)
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_seq_length: int = Field(2048, gt=0)
    on_overlength: Literal["drop", "truncate", "error"] = "drop"
    # Which tokens carry loss: every assistant turn (+ its end-of-turn token), only the last one,
    # the completion of prompt/completion rows, or every token.
    loss_on: Literal["assistant", "last_assistant", "completion", "all"] = "assistant"
    # None: the tokenizer's own; a built-in name (chatml, llama3, tulu, zephyr, alpaca); or a .jinja file.
    chat_template: str | None = None
    add_chatml_tokens: bool = False  # add <|im_start|>/<|im_end|> as special tokens and resize embeddings
    packing: Literal["none", "wrapped", "bfd"] = "none"
    num_proc: int = Field(1, gt=0)  # tokenization worker processes
    cache: bool = True  # cache tokenized/packed data on disk, keyed by content + tokenizer + config
    cache_dir: str | None = None  # default: $SFTLAB_CACHE/data (~/.cache/sftlab/data)
    on_bad_record: Literal["skip", "error"] = "skip"
    max_bad_fraction: float = Field(0.5, ge=0.0, le=1.0)  # skip mode still fails above this fraction


class OptimConfig(_Strict):
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None disables clipping (the norm is still logged)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.03, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(None, ge=0)  # overrides warmup_ratio when set


class TrainConfig(_Strict):
    output_dir: str = "runs/sft"
    micro_batch_size: int = Field(8, gt=0)
    # A token budget per micro-batch instead of a row count: packed rows, or length-grouped padded
    # examples, fill each micro-batch up to this many tokens (padding included). Overrides micro_batch_size.
    micro_batch_tokens: int | None = Field(None, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides num_epochs when set
    num_epochs: float = Field(1.0, gt=0)
    seed: int = 42
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)  # steps; None: only at the end (when there is eval data)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    # Recompute activations in the backward (non-reentrant): measured free on a 2-core AMX CPU at half the
    # peak memory (benchmarks/bench_train.py); on GPUs it typically costs ~20-30% of the step time.
    gradient_checkpointing: bool = True
    # auto: bf16 where the device runs it fast (CUDA with bf16; a CPU with AMX or AVX512-BF16), else fp32.
    # bf16/fp16: low-precision compute with fp32 master weights and optimizer state (through Accelerate).
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, v: Any) -> Any:
        return "no" if v is False else v  # YAML reads a bare `no` as false
    # target: the output projection and cross-entropy only at positions whose next token is a target,
    # in chunks of loss_chunk_tokens (no [tokens x vocab] logits); full: the model's own logits everywhere.
    loss_head: Literal["target", "full"] = "target"
    loss_chunk_tokens: int = Field(1024, gt=0)
    compile: bool = False  # torch.compile the model
    liger: bool = False  # Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); CUDA + liger-kernel
    peak_flops: float | None = Field(None, gt=0)  # for MFU; None: measured at start by a short matmul probe
    # "auto": continue from the latest complete checkpoint in output_dir, else start fresh;
    # a path: continue from that checkpoint; None: always start fresh.
    resume: str | None = None
    on_nan: Literal["stop", "skip_step"] = "stop"  # non-finite loss or gradient
    # NEFTune: uniform noise of scale alpha / sqrt(sequence length x hidden size) added to the input
    # embeddings in training forwards only (never in evaluation or generation). Typical: 5.
    neftune_alpha: float | None = Field(None, gt=0)


class PeftSettings(_Strict):
    """LoRA / DoRA adapters through peft (model/adapters.py); the `peft:` section, absent = full fine-tuning."""

    method: Literal["lora", "dora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear": every linear layer but the output head; else module names (e.g. [q_proj, v_proj]).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Modules trained in full beside the adapters; the embeddings and head are added automatically
    # when data.add_chatml_tokens grows the vocabulary.
    modules_to_save: list[str] | None = None
    quantize: Literal["nf4", "int8"] | None = None  # QLoRA: base weights quantized through bitsandbytes
    merge_on_save: bool = False  # also save the merged plain model under output_dir/merged


class CheckpointConfig(_Strict):
    every_steps: int | None = Field(None, gt=0)
    every_epoch: bool = False
    keep_last: int | None = Field(None, gt=0)  # rotation; never deletes the newest complete checkpoint


class MatchEvalConfig(_Strict):
    """Exact-match accuracy of greedy generations against the reference last assistant turn."""

    path: str
    max_examples: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0)


class SFTConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    peft: PeftSettings | None = None  # LoRA/DoRA/QLoRA; None: full fine-tuning
    match_eval: MatchEvalConfig | None = None  # run before and after training when set

    @model_validator(mode="after")
    def _check_across_sections(self) -> "SFTConfig":
        if not self.data.train:
            raise ValueError("data.train: at least one training source is required")
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
    return tree


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        got = "" if e["type"] == "extra_forbidden" else f" (got {e.get('input')!r})"
        lines.append(f"  {loc}: {msg}{got}")
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SFTConfig:
    """Read a YAML config (the packaged demo when `path` is None), apply overrides, validate."""
    cfg_path = Path(path) if path is not None else DEMO_CONFIG
    tree = _read_yaml(cfg_path)
    _resolve_paths(tree, cfg_path.resolve().parent)
    apply_overrides(tree, overrides or [])
    try:
        return SFTConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, str(cfg_path))) from None


def dump_config(cfg: SFTConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
