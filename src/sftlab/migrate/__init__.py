"""`sftlab convert-config`: turn another tool's training config into an sftlab config, printed as YAML that
`sftlab config show` accepts, with a comment on every key that has no counterpart (docs/migrating.md).

Each tool is one `Tool` entry in `TOOLS`: how its file is read (migrate/readers.py), its datasets, its value
converters (migrate/values.py), its defaults. TRL (SFTConfig/TrainingArguments/ModelConfig, as `trl sft
--config` reads), axolotl and LLaMA-Factory are here; open-instruct, Fast-LLM and HALOs have a module each.
`convert_tree` is the conversion of a mapping; the Python API converts a TRL `SFTConfig` or transformers
`TrainingArguments` object (`sftlab.train(args=...)`, trl_forms.py) through it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftlab.config.aliases import RENAMES
from sftlab.config.loading import resolve_config
from sftlab.config.schema import ConfigError
from sftlab.migrate import fast_llm, halos, open_instruct
from sftlab.migrate import values as v
from sftlab.migrate.datasets import axolotl_datasets, lf_datasets, trl_datasets
from sftlab.migrate.readers import hydra_override, read_mapping

# keys that need no counterpart, with the reason
NOT_NEEDED = {
    "do_train": "sftlab always trains",
    "do_eval": "validation runs when there is eval data",
    "stage": "sftlab does SFT",
    "logging_strategy": "train.log_every is in steps",
    "log_level": "sftlab logs its own lines",
    "remove_unused_columns": "unread fields are reported, never trained",
    "gradient_checkpointing_kwargs": "non-reentrant always",
    "ddp_timeout": "no collective timeout to set",
    "dataloader_num_workers": "batches come from memory-mapped arrays",
    "per_device_eval_batch_size": "eval uses train.micro_batch_size",
    "eval_batch_size": "eval uses train.micro_batch_size",
    "tf32": "TF32 matmuls are torch's setting",
    "plot_loss": "loss.png is always written",
    "overwrite_cache": "the data cache is keyed by content, tokenizer and template",
    "strict": "unknown keys are errors",
    "dataset_kwargs": "chat rows use the template's own special tokens",
    "pad_to_sequence_len": "rows are padded per batch",
    "model_type": "loaded with AutoModelForCausalLM",
    "tokenizer_type": "loaded with AutoTokenizer",
    "padding_free": "packed rows never carry padding",
    "fused_optimizer": "AdamW is fused where torch can",
    "lora_fan_in_fan_out": "peft reads it from the model",
    "quantization_method": "quantization is bitsandbytes",
    "lora_task_type": "always CAUSAL_LM",
    "xformers_attention": "model.attn_implementation chooses the kernel",
}

NOT_SUPPORTED = {  # keys with no counterpart, with what to do instead
    "max_samples": "sftlab's integer weight repeats a smaller source; set data.train.N.weight per source",
    "max_train_samples": "set data.train.N.weight (a count) per source",
    "evals_per_epoch": "validation runs every train.eval_every steps and at the end",
    "eval_max_new_tokens": "match_eval.max_new_tokens is for exact-match evaluation",
    "special_tokens": "the tokenizer's own tokens; data.add_chatml_tokens adds ChatML's",
    "deepspeed": "launch with accelerate: --config_file configs/accelerate/deepspeed_zero2.yaml (or zero3)",
    "fsdp": "launch with accelerate: --config_file configs/accelerate/fsdp.yaml",
    "fsdp_config": "launch with accelerate: --config_file configs/accelerate/fsdp.yaml",
    "early_stopping_patience": "a callback in the Python API (docs/python.md)",
    "rope_scaling": "set it in the model's config.json",
    "save_only_model": "checkpoints always hold the optimizer",
    "hub_strategy": "the final model is pushed once, at the end (train.push_to_hub)",
    "loss_watchdog_threshold": "train.on_nan stops on non-finite losses only",
    "loss_watchdog_patience": "train.on_nan stops on non-finite losses only",
    "group_by_length": "train.micro_batch_tokens batches length-grouped by a token budget",
    "dataset_prepared_path": "data.cache_dir holds the tokenized data",
}

HF = {  # TRL (SFTConfig, TrainingArguments, ModelConfig) and LLaMA-Factory share transformers' names
    "lr_scheduler_type": v.scheduler,
    "optim": v.optimizer,
    "adam_beta1": v.betas,
    "adam_beta2": v.betas,
    "bf16": v.precision,
    "fp16": v.precision,
    "torch_dtype": v.dtype,
    "dtype": v.dtype,
    "attn_implementation": v.attention,
    "use_flash_attention_2": v.attention,
    "warmup_steps": v.positive("optim.warmup_steps"),
    "max_steps": v.positive("train.max_steps"),
    "logging_steps": v.positive("train.log_every"),
    "eval_strategy": v.eval_strategy,
    "evaluation_strategy": v.eval_strategy,
    "save_strategy": v.save_strategy,
    "save_steps": v.save_steps,
    "report_to": v.report_to,
    "resume_from_checkpoint": v.resume,
    "use_peft": v.peft_on,
    "use_dora": v.peft_on,
    "load_in_4bit": v.quantize,
    "load_in_8bit": v.quantize,
    "completion_only_loss": v.loss,
    "assistant_only_loss": v.loss,
    "packing": v.packing,
    "metric_for_best_model": v.best_metric,
    "greater_is_better": lambda c, key, value, raw: None,  # read by best_metric
    "chat_template": v.chat_template,
    "chat_template_path": v.chat_template,
    "lora_r": v.peft_value,
    "lora_alpha": v.peft_value,
    "lora_dropout": v.peft_value,
    "lora_target_modules": v.peft_value,
    "lora_modules_to_save": v.peft_value,
    "use_rslora": v.peft_value,
}
LLAMAFACTORY = {
    **HF,
    "finetuning_type": v.peft_on,
    "lora_rank": v.peft_value,
    "lora_target": v.peft_value,
    "additional_target": v.peft_value,
    "quantization_bit": v.quantize,
    "template": v.chat_template,
    "flash_attn": v.attention,
    "attn": v.attention,
    "train_on_prompt": v.loss,
    "mask_history": v.loss,
    "neat_packing": v.packing,
}
AXOLOTL = {
    "adapter": v.peft_on,
    "peft_use_dora": v.peft_on,
    "load_in_4bit": v.quantize,
    "load_in_8bit": v.quantize,
    "lora_target_linear": v.peft_value,
    "optimizer": v.optimizer,
    "lr_scheduler": v.scheduler,
    "adam_beta1": v.betas,
    "adam_beta2": v.betas,
    "bf16": v.precision,
    "fp16": v.precision,
    "flash_attention": v.attention,
    "sdp_attention": v.attention,
    "attention": v.attention,
    "attn_implementation": v.attention,
    "warmup_steps": v.positive("optim.warmup_steps"),
    "max_steps": v.positive("train.max_steps"),
    "logging_steps": v.positive("train.log_every"),
    "eval_steps": v.positive("train.eval_every"),
    "save_steps": v.positive("checkpoint.every_steps"),
    "saves_per_epoch": v.saves_per_epoch,
    "resume_from_checkpoint": v.resume,
    "auto_resume_from_checkpoints": v.resume,
    "train_on_inputs": v.loss,
    "sample_packing": v.packing,
    "chat_template": v.chat_template,
    "chat_template_jinja": v.chat_template,
    "wandb_project": v.wandb,
    "wandb_entity": v.wandb,
    "wandb_name": v.wandb,
    "excess_length_strategy": v.overlength,
    **{k: v.peft_value for k in v.PEFT_SAME},
}
# read by the dataset and value converters, so no comment of their own
CONSUMED_TRL = {
    "dataset_name",
    "dataset_config",
    "dataset_configs",
    "dataset_train_split",
    "dataset_test_split",
    "dataset_mixer",
    "dataset_splits",
    "dataset_mixture",
    "dataset_text_field",
    "packing_strategy",
    "lr_scheduler_kwargs",
    "eval_steps",
}
CONSUMED_LLAMAFACTORY = {"dataset", "eval_dataset", "dataset_dir", "eval_steps", "lr_scheduler_kwargs"}
# the tool's own defaults where they differ from sftlab's and change results, written out when the file omits them
TRL_DEFAULTS = {
    "train.num_epochs": 3.0,
    "optim.warmup_ratio": 0.0,
    "data.max_seq_length": 1024,
    "data.on_overlength": "truncate",
}
LLAMAFACTORY_DEFAULTS = {
    "train.num_epochs": 3.0,
    "optim.lr": 5e-5,
    "optim.warmup_ratio": 0.0,
    "data.max_seq_length": 2048,
    "data.on_overlength": "truncate",
}
TRL_LOSS_NOTE = (
    "# note: TRL trains conversational rows on every token unless assistant_only_loss: true (prompt-completion "
    "rows on the completion); sftlab's default data.loss_on: assistant trains assistant turns only "
    "(data.loss_on: all reproduces TRL on messages rows)"
)
Handler = Callable[[v.Conversion, str, Any, dict], Any]


def _trl_notes(c: v.Conversion, raw: dict[str, Any]) -> None:
    if not {"assistant_only_loss", "completion_only_loss"} & set(raw):
        c.notes.append(TRL_LOSS_NOTE)


def _yaml(path: Path, overrides: list[str]) -> dict[str, Any]:
    """A YAML/JSON config; `key=value` overrides (Hydra's `++key=value` too) applied to it."""
    raw = read_mapping(path)
    for override in overrides:
        hydra_override(raw, override)
    return raw


@dataclass(frozen=True)
class Tool:
    """One tool `convert-config --from` reads: how its file is read (as a mapping of option names), its
    datasets, its value converters, the names it reads elsewhere, its defaults and its own no-counterparts."""

    read: Callable[[Path, list[str]], dict[str, Any]]
    datasets: Callable[[v.Conversion, dict[str, Any]], None]
    handlers: dict[str, Handler]
    consumed: set[str] = field(default_factory=set)
    defaults: dict[str, Any] = field(default_factory=dict)
    not_needed: dict[str, str] = field(default_factory=dict)
    not_supported: dict[str, str] = field(default_factory=dict)
    not_needed_prefixes: dict[str, str] = field(default_factory=dict)
    finish: Callable[[v.Conversion, dict[str, Any]], None] | None = None
    renames: bool = True  # transformers' names (config/aliases.py: RENAMES) carry over


TOOLS: dict[str, Tool] = {
    "trl": Tool(_yaml, trl_datasets, HF, CONSUMED_TRL, TRL_DEFAULTS, finish=_trl_notes),
    "axolotl": Tool(
        _yaml,
        axolotl_datasets,
        AXOLOTL,
        {"datasets", "test_datasets"},
        {"optim.warmup_ratio": 0.0, "train.micro_batch_size": 1},
    ),
    "llamafactory": Tool(_yaml, lf_datasets, LLAMAFACTORY, CONSUMED_LLAMAFACTORY, LLAMAFACTORY_DEFAULTS),
    "open-instruct": Tool(
        open_instruct.read,
        open_instruct.datasets,
        open_instruct.HANDLERS,
        open_instruct.CONSUMED,
        open_instruct.DEFAULTS,
        open_instruct.NOT_NEEDED,
        open_instruct.NOT_SUPPORTED,
        finish=open_instruct.finish,
    ),
    "fast-llm": Tool(
        fast_llm.read,
        fast_llm.datasets,
        fast_llm.HANDLERS,
        fast_llm.CONSUMED,
        fast_llm.DEFAULTS,
        fast_llm.NOT_NEEDED,
        renames=False,
    ),
    "halos": Tool(
        halos.read,
        halos.datasets,
        halos.HANDLERS,
        halos.CONSUMED,
        halos.DEFAULTS,
        halos.NOT_NEEDED,
        halos.NOT_SUPPORTED,
        halos.PREFIXES_NOT_NEEDED,
        finish=halos.finish,
        renames=False,
    ),
}


def _no_counterpart(tool: Tool, c: v.Conversion, key: str, value: Any) -> None:
    """The comment for a key that converts to nothing: not needed (why), not supported (what instead)."""
    prefix = next((p for p in tool.not_needed_prefixes if key.startswith(p)), None)
    if key in tool.not_needed or key in NOT_NEEDED or prefix:
        why = tool.not_needed.get(key) or NOT_NEEDED.get(key) or tool.not_needed_prefixes[prefix]
        c.skip(key, value, why, kind="not needed")
    elif key in tool.not_supported or key in NOT_SUPPORTED:
        c.skip(key, value, tool.not_supported.get(key) or NOT_SUPPORTED[key])
    else:
        c.skip(key, value, "no sftlab counterpart; docs/migrating.md")


def _convert_keys(tool: Tool, c: v.Conversion, raw: dict[str, Any]) -> None:
    """Each key: a value conversion of the tool's (handlers), else a plain rename (config/aliases.py: RENAMES),
    else a comment saying why it has no counterpart."""
    for key, value in raw.items():
        if value is None or key in tool.consumed:
            continue
        c.current = key
        if key in tool.handlers:
            tool.handlers[key](c, key, value, raw)
        elif tool.renames and key in RENAMES:
            c.set(RENAMES[key], v.number(value))
        else:
            _no_counterpart(tool, c, key, value)
    c.current = None


def _finish(tool: Tool, c: v.Conversion, placeholder: bool = True) -> None:
    if c.peft_on:
        c.tree["peft"] = c.peft
    else:
        for key, value in c.peft.items():
            c.skip(f"peft {key}", value, "LoRA is off in this file")
        c.mapped = {k: [t for t in keys if not t.startswith("peft.")] for k, keys in c.mapped.items()}
    for key, value in tool.defaults.items():
        if key not in c.seen:
            c.set(key, value)
            shown = "null" if value is None else value
            c.notes.append(f"# note: {key}: {shown} is {c.tool}'s default (sftlab's differs)")
    if not c.sources and placeholder:
        c.sources.append({"path": "data/train.jsonl"})
        c.notes.append("# note: the file names no training data: data.train.0.path is a placeholder")
    c.tree.setdefault("data", {})["train"] = [
        {k: x for k, x in s.items() if x not in (None, {}, [])} for s in c.sources
    ]
    if c.eval_sources:
        c.tree["data"]["eval"] = [
            {k: x for k, x in s.items() if x not in (None, {}, [])} for s in c.eval_sources
        ]


def convert_tree(raw: dict[str, Any], tool: str, base: Path, placeholder: bool = True) -> v.Conversion:
    """Another tool's options (a mapping) converted: `c.tree` the sftlab config tree, `c.mapped` which sftlab
    keys each option set, `c.notes` and `c.skipped` the comments. `base`: where relative paths are looked
    up; `placeholder`: name a placeholder training file when the options name no data (a config file; the
    Python API passes its datasets)."""
    spec = TOOLS[tool]
    c = v.Conversion(tool, base)
    spec.datasets(c, raw)
    _convert_keys(spec, c, raw)
    if spec.finish is not None:
        spec.finish(c, raw)
    _finish(spec, c, placeholder)
    return c


def convert_config(path: str | Path, tool: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The sftlab YAML for another tool's config file (with the tool's command-line overrides): comments
    first (notes, keys not converted), then the keys that carry over, validated as sftlab loads them."""
    if tool not in TOOLS:
        raise ConfigError(f"--from {tool}: expected one of {', '.join(TOOLS)}")
    raw = TOOLS[tool].read(Path(path), list(overrides))
    c = convert_tree(raw, tool, Path(path).resolve().parent)
    cfg = resolve_config(c.tree)
    body = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    head = [f"# sftlab config converted from {Path(path).name} (--from {tool}) by `sftlab convert-config`"]
    return "\n".join(head + c.notes + c.skipped) + "\n" + body


def print_converted(ns: Any) -> int:
    """`sftlab convert-config FILE --from TOOL [OVERRIDE ...]`: print the converted config."""
    print(convert_config(ns.file, ns.tool, getattr(ns, "args", None) or ()), end="")
    return 0
