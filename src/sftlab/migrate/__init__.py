"""`sftlab convert-config`: turn a TRL (SFTConfig/TrainingArguments/ModelConfig, as `trl sft --config`
reads), axolotl or LLaMA-Factory training config into an sftlab config, printed as YAML that
`sftlab config show` accepts, with a comment on every key that has no counterpart (docs/migrating.md).
`convert_tree` is the conversion of a mapping; the Python API converts a TRL `SFTConfig` or transformers
`TrainingArguments` object (`sftlab.train(args=...)`, trl_forms.py) through it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sftlab.config.aliases import RENAMES
from sftlab.config.loading import resolve_config
from sftlab.config.schema import ConfigError
from sftlab.migrate import values as v
from sftlab.migrate.datasets import axolotl_datasets, lf_datasets, trl_datasets

TOOLS = ("trl", "axolotl", "llamafactory")
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
    "run_name": "the run is named by train.output_dir",
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
    "excess_length_strategy": v.overlength,
    **{k: v.peft_value for k in v.PEFT_SAME},
}
HANDLERS = {"trl": HF, "llamafactory": LLAMAFACTORY, "axolotl": AXOLOTL}
DATASETS = {"trl": trl_datasets, "axolotl": axolotl_datasets, "llamafactory": lf_datasets}
# read by the dataset and value converters, so no comment of their own
CONSUMED = {
    "trl": {
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
    },
    "axolotl": {"datasets", "test_datasets"},
    "llamafactory": {"dataset", "eval_dataset", "dataset_dir", "eval_steps", "lr_scheduler_kwargs"},
}
# the tool's own defaults where they differ from sftlab's and change results, written out when the file omits them
DEFAULTS = {
    "trl": {
        "train.num_epochs": 3.0,
        "optim.warmup_ratio": 0.0,
        "data.max_seq_length": 1024,
        "data.on_overlength": "truncate",
    },
    "llamafactory": {
        "train.num_epochs": 3.0,
        "optim.lr": 5e-5,
        "optim.warmup_ratio": 0.0,
        "data.max_seq_length": 2048,
        "data.on_overlength": "truncate",
    },
    "axolotl": {"optim.warmup_ratio": 0.0, "train.micro_batch_size": 1},
}
TRL_LOSS_NOTE = (
    "# note: TRL trains conversational rows on every token unless assistant_only_loss: true (prompt-completion "
    "rows on the completion); sftlab's default data.loss_on: assistant trains assistant turns only "
    "(data.loss_on: all reproduces TRL on messages rows)"
)


def read_foreign(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a mapping."""
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is neither YAML nor JSON: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of option names at the top level")
    return tree


def _convert_keys(c: v.Conversion, raw: dict[str, Any]) -> None:
    """Each key: a value conversion of the tool's (HANDLERS), else a plain rename (config/aliases.py: RENAMES),
    else a comment saying why it has no counterpart."""
    handlers, consumed = HANDLERS[c.tool], CONSUMED[c.tool]
    for key, value in raw.items():
        if value is None or key in consumed:
            continue
        c.current = key
        if key in handlers:
            handlers[key](c, key, value, raw)
        elif key in RENAMES:
            c.set(RENAMES[key], v.number(value))
        elif key in NOT_NEEDED:
            c.skip(key, value, NOT_NEEDED[key], kind="not needed")
        elif key in NOT_SUPPORTED:
            c.skip(key, value, NOT_SUPPORTED[key])
        else:
            c.skip(key, value, "no sftlab counterpart; docs/migrating.md")
    c.current = None


def _finish(c: v.Conversion, placeholder: bool = True) -> None:
    if c.peft_on:
        c.tree["peft"] = c.peft
    else:
        for key, value in c.peft.items():
            c.skip(f"peft {key}", value, "LoRA is off in this file")
        c.mapped = {k: [t for t in keys if not t.startswith("peft.")] for k, keys in c.mapped.items()}
    for key, value in DEFAULTS[c.tool].items():
        if key not in c.seen:
            c.set(key, value)
            c.notes.append(f"# note: {key}: {value} is {c.tool}'s default (sftlab's differs)")
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
    c = v.Conversion(tool, base)
    DATASETS[tool](c, raw)
    _convert_keys(c, raw)
    if tool == "trl" and not {"assistant_only_loss", "completion_only_loss"} & set(raw):
        c.notes.append(TRL_LOSS_NOTE)
    _finish(c, placeholder)
    return c


def convert_config(path: str | Path, tool: str) -> str:
    """The sftlab YAML for another tool's config file: comments first (notes, keys not converted), then
    the keys that carry over, validated as sftlab loads them."""
    if tool not in TOOLS:
        raise ConfigError(f"--from {tool}: expected one of {', '.join(TOOLS)}")
    raw = read_foreign(path)
    c = convert_tree(raw, tool, Path(path).resolve().parent)
    cfg = resolve_config(c.tree)
    body = yaml.safe_dump(cfg.model_dump(mode="json", exclude_unset=True), sort_keys=False)
    head = [f"# sftlab config converted from {Path(path).name} (--from {tool}) by `sftlab convert-config`"]
    return "\n".join(head + c.notes + c.skipped) + "\n" + body


def print_converted(ns: Any) -> int:
    """`sftlab convert-config FILE --from TOOL`: print the converted config."""
    print(convert_config(ns.file, ns.tool), end="")
    return 0
