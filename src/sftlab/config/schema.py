"""The run configuration's schema: one pydantic model per YAML section (`SFTConfig` holds them).

Every key has a type, a default and a description (`sftlab config reference` prints them: reference.py,
docs/config.md is that output). The row formats' field names and the checks of `columns` and marker
templates are in fields.py; reading a YAML file and the Python API's keyword arguments in loading.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sftlab.config.fields import FORMATS, ROLES, check_columns, check_markers, sources_shorthand
from sftlab.errors import SftlabError


class ConfigError(SftlabError, ValueError):
    """A configuration problem, with the dotted key path in its message."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The model to fine-tune and how it is loaded."""

    name_or_path: str = Field(
        "default",
        description=(
            "`default` (the embedded SmolLM2-135M-Instruct GGUF), a local Hugging Face model directory, a .gguf "
            "file, or a hub id"
        ),
    )
    gguf_file: str | None = Field(
        None, description="file name inside name_or_path when it is a directory holding GGUFs"
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32",
        description=(
            "the dtype the weights are stored and saved in; bfloat16/float16 keep fp32 master weights in the "
            "optimizer, so small updates are not lost to rounding; auto: the dtype the checkpoint was saved in "
            "(its config's dtype; float32 when it names none)"
        ),
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description=(
            "attention kernel; flash_attention_2 needs CUDA and flash-attn (packed rows then run as varlen attention)"
        ),
    )
    trust_remote_code: bool = Field(
        False, description="run model code shipped with a hub model (off unless you trust it)"
    )
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    freeze: list[Literal["vision", "projector", "language"]] = Field(
        ["vision"],
        description=(
            "parts of a vision-language model kept frozen in full fine-tuning: vision (the vision tower), projector "
            "(the multimodal projector), language (the language model and its head); ignored for text-only models"
        ),
    )
    tokenizer: str | None = Field(
        None,
        description=(
            "the tokenizer's directory or hub id when it is not the model's own (open-instruct's tokenizer_name)"
        ),
    )
    tokenizer_revision: str | None = Field(None, description="hub revision of model.tokenizer")
    init_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "more keyword arguments for from_pretrained (TRL's model_init_kwargs), e.g. {low_cpu_mem_usage: true}; "
            "keys sftlab sets from its own keys (dtype, revision, ...) are refused with the key to use"
        ),
    )

    @field_validator("init_kwargs")
    @classmethod
    def _own_keys_elsewhere(cls, init_kwargs: dict[str, Any]) -> dict[str, Any]:
        owned = {
            "dtype": "model.dtype",
            "torch_dtype": "model.dtype",
            "revision": "model.revision",
            "attn_implementation": "model.attn_implementation",
            "trust_remote_code": "model.trust_remote_code",
            "quantization_config": "peft.quantize",
            "gguf_file": "model.gguf_file",
        }
        for key in init_kwargs:
            if key in owned:
                raise ValueError(f"init_kwargs.{key}: set by sftlab; use {owned[key]}")
        return init_kwargs


class SourceConfig(_Strict):
    """One data source."""

    path: str = Field(
        description=(
            "a local JSONL/JSON/Parquet/CSV file or directory, a `datasets.save_to_disk` directory, or a hub dataset "
            "name"
        )
    )
    name: str | None = Field(
        None,
        description=(
            "a name for the source (reports); an eval source with a name also gets its own validation loss, "
            "`eval/<name>_loss` (sources of the same name together)"
        ),
    )
    format: Literal[FORMATS] = Field(
        "auto",
        description=(  # type: ignore[valid-type]
            "row format; auto detects it per row from the keys"
        ),
    )
    weight: float | int | None = Field(
        None,
        gt=0,
        description=(
            "mixing: a float <= 1.0 takes that fraction of the source, an integer > 1 that many examples (repeating "
            "the source when it is smaller); null takes the source once"
        ),
    )
    split: str = Field("train", description="split of a hub dataset or DatasetDict directory")
    subset: str | None = Field(None, description="hub dataset configuration name")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "rename the source's own fields onto the format's, `{format_field: your_field}`: e.g. `{prompt: question, "
            "completion: answer}`; inside message lists `role`/`content` (messages, prompt/completion lists) and "
            "`from`/`value` (ShareGPT turns) are mapped the same way (docs/data.md)"
        ),
    )
    roles: dict[str, Literal[ROLES]] = Field(
        default_factory=dict,
        description=(  # type: ignore[valid-type]
            "rename role names of messages (`role`) and ShareGPT turns (`from`), `{your_role: role}`: e.g. "
            "`{human: user, bot: assistant}`; roles are system, user, assistant, tool"
        ),
    )
    response_template: str | None = Field(
        None,
        min_length=1,
        description=(
            "this source's own data.response_template (with its own instruction_template); null: the data section's"
        ),
    )
    instruction_template: str | None = Field(
        None,
        min_length=1,
        description=("this source's own data.instruction_template; needs this source's response_template"),
    )

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, columns: dict[str, str], info: Any) -> dict[str, str]:
        return check_columns(columns, info.data.get("format", "auto"))

    @field_validator("instruction_template")
    @classmethod
    def _marker_pair(cls, instruction_template: str | None, info: Any) -> str | None:
        return check_markers(info.data.get("response_template"), instruction_template)


class DataConfig(_Strict):
    """Training and validation data: sources, template, masks, lengths, packing, preparation."""

    train: list[SourceConfig] = Field(
        default_factory=list,
        description=(
            "training sources (at least one); a bare path (or list of paths) is a source with every default"
        ),
    )
    eval: list[SourceConfig] = Field(
        default_factory=list,
        description=(
            "validation sources; when empty, eval_fraction of the mixed training examples is held out"
        ),
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _path_shorthand(cls, sources: Any) -> Any:
        return sources_shorthand(sources)

    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "fraction of training examples held out for validation (0 with no eval sources: no validation loss)"
        ),
    )
    max_seq_length: int | None = Field(
        2048,
        gt=0,
        description=(
            "longest example (and packed row) in tokens; null: the model's max_position_embeddings (no limit "
            "of sftlab's own; refused when the model's config names none)"
        ),
    )
    on_overlength: Literal["drop", "truncate", "error"] = Field(
        "drop",
        description=(
            "what happens to an example longer than max_seq_length (every case is counted in the data report)"
        ),
    )
    loss_on: Literal["assistant", "last_assistant", "completion", "all"] = Field(
        "assistant",
        description=(
            "which tokens of chat rows carry loss: assistant: every assistant turn (content + its end-of-turn token); "
            "last_assistant: only the last assistant turn; completion: the same as last_assistant, but a row that does "
            "not end with an assistant message is bad (for prompt/completion rows: the final assistant message of the "
            "completion); all: every token. Text and pretokenized rows keep their own masks (docs/data.md)"
        ),
    )
    response_template: str | None = Field(
        None,
        min_length=1,
        description=(
            "text rows: only the text after this marker carries loss (TRL's completion-only response_template, found "
            "by string search on the text, so it never depends on how the marker tokenizes); a text without it is a "
            "bad row; the marker itself is not trained (docs/data.md)"
        ),
    )
    instruction_template: str | None = Field(
        None,
        min_length=1,
        description=(
            "text rows, with response_template (multi-turn): the loss covers the text after each response marker up "
            "to the next instruction marker; an instruction marker with no response marker after it makes a bad row"
        ),
    )

    @field_validator("instruction_template")
    @classmethod
    def _marker_pair(cls, instruction_template: str | None, info: Any) -> str | None:
        return check_markers(info.data.get("response_template"), instruction_template)

    chat_template: str | None = Field(
        None,
        description=(
            "null: the tokenizer's own; a built-in name (chatml, llama3, tulu, zephyr, alpaca; with tools: chatml_tools, "
            "llama3_tools); or a .jinja file"
        ),
    )
    tools: Literal["error", "drop"] = Field(
        "error",
        description=(
            "rows with tool schemas (`tools`), assistant `tool_calls` or tool results that the chat template does not "
            "render: error: stop before training, naming the row (use a tool template, e.g. chat_template: "
            "chatml_tools); drop: train without them (one warning counts the rows)"
        ),
    )
    add_bos: bool = Field(
        False,
        description=(
            "start every chat example with the tokenizer's BOS token (no loss on it) when the template writes none "
            "(e.g. ChatML on a model pretrained with a BOS); text rows get the tokenizer's own special tokens"
        ),
    )
    pad_vocab_to_multiple_of: int | None = Field(
        None,
        gt=0,
        description=(
            "when tokens are added (add_chatml_tokens), round the embedding rows up to a multiple of this (64 or "
            "128 suits GPU kernels); the extra rows are never produced by the tokenizer"
        ),
    )
    add_chatml_tokens: bool = Field(
        False,
        description=(
            "add <|im_start|>/<|im_end|> as special tokens and grow the embeddings (for the chatml template on a base "
            "model)"
        ),
    )
    packing: Literal["none", "wrapped", "bfd"] = Field(
        "none",
        description=(
            "none: one example per row; bfd: whole documents packed best-fit-decreasing into rows of max_seq_length; "
            "wrapped: concatenated and cut (documents may split). Packed documents never attend to each other; "
            "true (TRL's packing=True) is bfd, false is none"
        ),
    )

    @field_validator("packing", mode="before")
    @classmethod
    def _bool_packing(cls, packing: Any) -> Any:
        """TRL's `packing: true` (and a Python True) packs whole documents: bfd; false is none."""
        return {True: "bfd", False: "none"}.get(packing, packing) if isinstance(packing, bool) else packing

    eval_packing: bool = Field(
        False,
        description=(
            "pack the eval sets too (best-fit rows of max_seq_length, never wrapped, so no document is cut): fewer, "
            "fuller forwards; the loss equals unpacked eval up to float rounding (TRL's eval_packing)"
        ),
    )
    num_proc: int = Field(1, gt=0, description="tokenization worker processes")
    cache: bool = Field(
        True,
        description=(
            "keep tokenized data on disk (memory-mapped arrays), keyed by content + tokenizer + template + code"
        ),
    )
    cache_dir: str | None = Field(
        None, description="where the data cache lives (default $SFTLAB_CACHE/data, ~/.cache/sftlab/data)"
    )
    on_bad_record: Literal["skip", "error"] = Field(
        "skip",
        description=("skip: report bad rows (file:line, field, reason) and go on; error: stop at the first"),
    )
    max_bad_fraction: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description=(
            "skip mode still fails when more rows than this of any one source (train or eval) are bad; a source left "
            "with no example is an error whatever this is"
        ),
    )


class OptimConfig(_Strict):
    """The optimizer (AdamW by default) and the learning-rate schedule."""

    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "adafactor", "sgd"] = Field(
        "adamw",
        description=(
            "adamw (torch, fused); adamw_8bit / paged_adamw_8bit (bitsandbytes' 8-bit states; pip install "
            "'sftlab[qlora]'); adafactor (transformers', at the fixed lr given, no relative step); sgd (momentum "
            "optim.momentum)"
        ),
    )
    lr: float = Field(2e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (never on biases and norms)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, description="AdamW epsilon")
    max_grad_norm: float | None = Field(
        1.0,
        description=(
            "gradient clipping norm; null, 0 or a negative value (open-instruct's -1) disables clipping and is read as "
            "null (the norm is still logged)"
        ),
    )
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="decay after warmup")
    warmup_ratio: float = Field(
        0.03,
        ge=0.0,
        le=1.0,
        description=("warmup as a fraction of the optimizer steps (rounded up); see warmup_steps"),
    )
    warmup_steps: int | None = Field(
        None,
        ge=0,
        description=(
            "warmup in optimizer steps, overrides warmup_ratio: W warmup steps run at lr*1/(W+1) .. lr*W/(W+1) (no step "
            "at lr 0), step W+1 at the peak lr, then the decay; the last step's lr is above 0 (linear: lr/(steps-W))"
        ),
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "the decay ends at this fraction of the peak lr instead of 0 (Fast-LLM's minimum lr, open-instruct's "
            "final_lr_ratio): lr * (min + (1 - min) * f)"
        ),
    )
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum (optim.name: sgd)")

    @field_validator("max_grad_norm")
    @classmethod
    def _off_at_or_below_zero(cls, max_grad_norm: float | None) -> float | None:
        # torch's clip with a negative norm scales every gradient by a negative factor (and 0 zeroes them)
        return max_grad_norm if max_grad_norm is not None and max_grad_norm > 0 else None


class TrainConfig(_Strict):
    """The training loop: batch geometry, length, precision, speed, resume, logging."""

    output_dir: str = Field(
        "runs/sft",
        description=(
            "where the model, metrics, report and checkpoints go; a non-empty one is refused unless resuming or "
            "overwrite is set"
        ),
    )
    overwrite: bool = Field(
        False,
        description=(
            "allow an output_dir that already holds a run (its model, checkpoints and marker are removed first) or "
            "other files; train.resume takes precedence"
        ),
    )
    micro_batch_size: int = Field(
        8, gt=0, description="examples (or packed rows) per micro-batch per process"
    )
    micro_batch_tokens: int | None = Field(
        None,
        gt=0,
        description=(
            "a token budget per micro-batch instead of a row count (padding included); overrides micro_batch_size"
        ),
    )
    grad_accum_steps: int = Field(
        1,
        gt=0,
        description=(
            "micro-batches per optimizer step; the loss is normalised over all target tokens of the step"
        ),
    )
    global_batch_size: int | None = Field(
        None,
        gt=0,
        description=(
            "examples (rows when packed) per optimizer step over all processes; grad_accum_steps is derived "
            "from it (global_batch_size / (micro_batch_size x processes), printed; refused when it does not "
            "divide); null: micro_batch_size x grad_accum_steps x processes"
        ),
    )
    loss_normalization: Literal["tokens", "micro_batch_mean", "sequence_mean"] = Field(
        "tokens",
        description=(
            "what the step's summed loss is divided by. tokens: the step's target tokens over all micro-batches "
            "and processes (each target token weighs the same); micro_batch_mean: each micro-batch's mean, "
            "averaged (HALOs, TRL before 0.13, CS336's handout); sequence_mean: each sequence's mean, averaged "
            "(a packed row's documents count one each). Evaluation always reports the token mean"
        ),
    )
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; overrides num_epochs when set")
    num_epochs: float = Field(1.0, gt=0, description="passes over the training data")
    seed: int = Field(42, description="seed of data order, mixing, eval split and initialisation")
    log_every: int = Field(1, gt=0, description="log a metrics line every N optimizer steps")
    eval_every: Annotated[int, Field(gt=0)] | Literal["epoch"] | None = Field(
        None,
        description="validation loss every N steps, or at the end of each epoch (epoch); null: only at the end",
    )
    dist_timeout: int = Field(
        1800,
        gt=0,
        description=(
            "seconds a rank waits in a collective (several processes) before the run stops with an error "
            "instead of hanging; the first data preparation waits outside any collective, so it may take longer"
        ),
    )
    sequence_parallel: int = Field(
        1,
        ge=1,
        description=(
            "processes that split each sequence between them (sequence parallelism, docs/distributed.md): every "
            "micro-batch is cut along its length into this many shards, one per process of a group, and the "
            "data-parallel world is processes / this; 1: off. Needs a DeepSpeed launch (Ulysses)"
        ),
    )
    sequence_parallel_backend: Literal["auto", "deepspeed", "torch"] = Field(
        "auto",
        description=(
            "engine of train.sequence_parallel: deepspeed (DeepSpeed Ulysses, ALST: CPU processes and CUDA), torch "
            "(torch context parallel: needs CUDA and is not wired into sftlab yet, so refused), auto (the one the "
            "launch's engine provides)"
        ),
    )
    eval_on_start: bool = Field(
        False, description="validation before the first step too (step 0 in metrics.jsonl; not when resuming)"
    )
    sample_every: Annotated[int, Field(gt=0)] | Literal["eval"] | None = Field(
        None,
        description=(
            "generate replies to a few fixed eval prompts every N steps, or at each evaluation (eval); shown in "
            "metrics.jsonl (`samples`), the console, tensorboard/wandb text and report.md; null: never"
        ),
    )
    sample_prompts: int = Field(3, gt=0, description="how many eval prompts sample_every generates for")
    sample_max_new_tokens: int = Field(64, gt=0, description="the longest reply sample_every generates")
    load_best_model_at_end: bool = Field(
        False,
        description=(
            "save the model of the evaluated step with the lowest metric_for_best instead of the last one (every "
            "evaluation then also checkpoints, and rotation keeps the best checkpoint)"
        ),
    )
    metric_for_best: str = Field("eval_loss", description="eval_loss, or a named eval set's eval/<name>_loss")
    eval_max_batches: int | None = Field(
        None,
        gt=0,
        description=(
            "validation on only the first N micro-batches of each eval set (over all processes; Fast-LLM's "
            "evaluation iterations); null: all of it"
        ),
    )
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "recompute activations in the backward (about a third more FLOPs, far less activation memory); auto: "
            "only when the planned micro-batch's activations would not fit the free memory (trainer/recompute.py)"
        ),
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto",
        description=(
            "auto: bf16 where the device runs it fast (CUDA with bf16; a CPU with AMX or AVX512-BF16), else fp32 "
            "(SFTLAB_AUTO_MIXED_PRECISION=bf16|no pins it); bf16: AdamW keeps fp32 master weights of bf16 copies, "
            "the other optimizers keep fp32 weights under bf16 autocast"
        ),
    )

    allocator: Literal["auto", "tcmalloc", "jemalloc", "system"] = Field(
        "auto",
        description=(
            "host memory allocator (Linux): auto preloads tcmalloc (else jemalloc) for a CPU run where it is "
            "installed (`make setup` fetches tcmalloc; glibc's malloc fragments across a step's layers: more "
            "memory, slower steps), system on a GPU host; `sftlab train` re-executes itself once with it in "
            "LD_PRELOAD (trainer/allocator.py)"
        ),
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no_is_false(cls, mixed_precision: Any) -> Any:
        return "no" if mixed_precision is False else mixed_precision  # YAML reads a bare `no` as false

    loss_head: Literal["target", "full"] = Field(
        "target",
        description=(
            "target: output projection and cross-entropy only where the next token is a target, in chunks (no full "
            "logits tensor); full: the model's own logits everywhere"
        ),
    )
    loss_chunk_tokens: int = Field(
        1024,
        gt=0,
        description="rows per chunk of the target-only loss head (at most 256 where its weight is frozen)",
    )
    packed_attention: Literal["auto", "documents", "flex", "mask"] = Field(
        "auto",
        description=(
            "how packed rows keep documents apart: documents (one causal SDPA call per document, no mask: attention "
            "FLOPs grow with each document's length squared, not the row's; one operator under train.compile), flex "
            "(FlexAttention with a document block mask; trains on CUDA only), mask (transformers' dense block mask), "
            "auto (times documents and mask on the model's head shape on this device, once per process; with "
            "train.compile the fastest whole step this machine measured)"
        ),
    )
    compile: bool | Literal["auto"] = Field(
        "auto",
        description=(
            "torch.compile the model's repeated blocks (its decoder layers, one graph for all; the embedding and the "
            "loss head stay eager): true, false, or auto (on for a packed run with micro_batch_size when the time "
            "it saves pays the compile time back 1.5x over, by this machine's measurements of earlier runs or "
            "estimates (a CPU needs a measured gain); off for short runs, unpacked rows, vision models, FSDP/DeepSpeed); compiled packed runs pad "
            "every micro-batch to one shape"
        ),
    )
    compile_backend: str = Field(
        "inductor", description="torch.compile backend (inductor; aot_eager to debug)"
    )
    liger: bool = Field(
        False,
        description="Liger kernels (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU); CUDA + liger-kernel",
    )
    peak_flops: float | None = Field(None, gt=0, description="peak FLOP/s for MFU; null: measured at start")
    resume: str | None = Field(
        None,
        description=(
            "auto: continue from the latest complete checkpoint in output_dir (else start fresh); a path: that "
            "checkpoint; null: start fresh"
        ),
    )
    on_nan: Literal["stop", "skip_step"] = Field(
        "stop", description="what a non-finite loss or gradient does"
    )
    neftune_alpha: float | None = Field(
        None,
        gt=0,
        description=(
            "NEFTune: uniform noise of scale alpha / sqrt(length x hidden) on the input embeddings, training forwards "
            "only (typical: 5)"
        ),
    )
    report_to: list[Literal["tensorboard", "wandb", "trackio"]] = Field(
        default_factory=list,
        description=(
            "experiment trackers besides metrics.jsonl (offline: tensorboard event files, wandb offline mode without "
            "an API key, trackio local)"
        ),
    )
    run_name: str | None = Field(
        None, description="the run's name in the trackers (wandb, trackio); null: the output directory's name"
    )
    project: str | None = Field(
        None,
        description=(
            "the trackers' project (tensorboard: the subdirectory of output_dir/tensorboard/); null: WANDB_PROJECT "
            "for wandb when set, else the output directory's name"
        ),
    )
    entity: str | None = Field(
        None, description="the wandb entity (team or user); null: WANDB_ENTITY, else yours"
    )
    push_to_hub: bool = Field(
        False,
        description=(
            "upload the final model (or adapter), tokenizer, model card, report and config.yaml to the Hugging Face Hub "
            "when the run ends (never checkpoints/); the token (HF_TOKEN or `hf auth login`) and the endpoint are "
            "checked before training starts; a failed upload keeps the local run and prints the `sftlab push` retry"
        ),
    )
    hub_model_id: str | None = Field(
        None,
        description=(
            "the Hub repository, `namespace/name` (required with push_to_hub); also the id in the model card's "
            "usage snippet"
        ),
    )
    hub_private: bool = Field(
        False, description="create the Hub repository private (an existing one keeps its visibility)"
    )
    hub_revision: str | None = Field(
        None, description="push to this branch (created from main if missing); null: main"
    )

    @model_validator(mode="after")
    def _hub_repo_named(self) -> "TrainConfig":
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError(
                "train.push_to_hub needs train.hub_model_id, the repository to push to: set "
                "train.hub_model_id=<your-user-or-org>/<name>"
            )
        if self.hub_model_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", self.hub_model_id):
            raise ValueError(
                f"train.hub_model_id {self.hub_model_id!r}: not a repository id (namespace/name, "
                "letters, digits, '-', '_', '.')"
            )
        return self


class PeftSettings(_Strict):
    """LoRA / DoRA adapters through peft; the whole section absent (null) = full fine-tuning."""

    method: Literal["lora", "dora"] = Field("lora", description="adapter kind")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: list[str] | str = Field(
        "all-linear",
        description=(
            "all-linear: every linear layer but the output head; a list of module names, e.g. [q_proj, v_proj]; "
            "any other string is a regular expression that peft matches against the full module names, e.g. "
            "'.*layers\\.(0|1)\\..*(q|v)_proj'"
        ),
    )
    use_rslora: bool = Field(
        False, description="rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r"
    )
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description=("which biases train beside the adapters (peft's LoraConfig.bias)")
    )
    modules_to_save: list[str] | None = Field(
        None,
        description=(
            "modules trained in full beside the adapters; embeddings and head are added when add_chatml_tokens grows "
            "the vocabulary"
        ),
    )
    quantize: Literal["nf4", "int8"] | None = Field(
        None, description=("QLoRA: base weights quantized through bitsandbytes (pip install 'sftlab[qlora]')")
    )
    merge_on_save: bool = Field(False, description="also save the merged plain model under output_dir/merged")

    @field_validator("target_modules")
    @classmethod
    def _valid_pattern(cls, target_modules: list[str] | str) -> list[str] | str:
        if isinstance(target_modules, str) and target_modules != "all-linear":
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return target_modules


class CheckpointConfig(_Strict):
    """Periodic checkpoints for exact resume."""

    every_steps: int | None = Field(
        None,
        gt=0,
        description=(
            "checkpoint every N optimizer steps; `epoch` is read as every_epoch: true (open-instruct's spelling)"
        ),
    )
    every_epoch: bool = Field(False, description="checkpoint at every epoch boundary")
    keep_last: int | None = Field(
        None, gt=0, description="rotation: keep this many; the newest complete one is never deleted"
    )
    delete_at_end: bool = Field(
        False,
        description=(
            "delete the checkpoints once the run has finished and its final model is saved (open-instruct's "
            "clean_checkpoints_at_end); a run that stops early keeps them for resume"
        ),
    )
    save_hf_model: bool = Field(
        False,
        description=(
            "each checkpoint also holds hf/: a plain Hugging Face model directory (weights in model.dtype, tokenizer, "
            "chat template) that from_pretrained loads as is (Fast-LLM's periodic export)"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _epoch_spelling(cls, section: Any) -> Any:
        if (
            isinstance(section, dict)
            and isinstance(section.get("every_steps"), str)
            and section["every_steps"].strip().lower() == "epoch"
        ):
            section = {**section, "every_steps": None, "every_epoch": True}
        return section


class MatchEvalConfig(_Strict):
    """Exact-match accuracy of greedy generations against the reference last assistant turn."""

    path: str = Field(description="conversations whose last message is the reference assistant reply")
    max_examples: int | None = Field(None, gt=0, description="evaluate only the first N")
    max_new_tokens: int = Field(32, gt=0, description="generation budget per reply")
    batch_size: int = Field(32, gt=0, description="generation batch size")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "rename the file's own fields onto the format's, as a data source's `columns` (docs/data.md)"
        ),
    )
    roles: dict[str, Literal[ROLES]] = Field(
        default_factory=dict,
        description=(  # type: ignore[valid-type]
            "rename role names, as a data source's `roles`"
        ),
    )

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
    match_eval: MatchEvalConfig | None = Field(
        None, description="exact-match evaluation before and after training"
    )

    @model_validator(mode="after")
    def _check_across_sections(self) -> "SFTConfig":
        micro_batch_tokens = self.train.micro_batch_tokens
        if self.train.global_batch_size is not None and micro_batch_tokens is not None:
            raise ValueError(
                "train.global_batch_size counts rows; with train.micro_batch_tokens (a token budget) the rows of "
                "a micro-batch vary: set train.grad_accum_steps instead"
            )
        max_seq_length = self.data.max_seq_length
        if (
            micro_batch_tokens is not None
            and max_seq_length is not None
            and micro_batch_tokens < max_seq_length
        ):
            raise ValueError(
                f"train.micro_batch_tokens ({micro_batch_tokens}) must be at least data.max_seq_length "
                f"({self.data.max_seq_length}): a micro-batch must hold the longest row"
            )
        return self
