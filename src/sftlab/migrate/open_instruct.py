"""`sftlab convert-config --from open-instruct`: open-instruct's `finetune.py` (its `FlatArguments` and
`TokenizerConfig`), given as the YAML file it reads or as the shell command or script that launches it
(argparse flags; `accelerate launch`'s process count and DeepSpeed config are read too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sftlab.migrate.values as v
from sftlab.migrate.datasets import HUB_NOTE
from sftlab.migrate.readers import argparse_flags, command_tokens, hydra_override, read_mapping

NOT_NEEDED = {
    "do_not_randomize_output_dir": "train.output_dir is used as given",
    "add_seed_and_date_to_exp_name": "train.output_dir is used as given",
    "use_slow_tokenizer": "the tokenizer's fast version is used; masks come from its offsets",
    "dataset_transform_fn": "sftlab tokenizes and masks each row format itself",
    "dataset_target_columns": "sftlab tokenizes and masks each row format itself",
    "dataset_cache_mode": "the cache is keyed by content, tokenizer, template and code",
    "dataset_skip_cache": "the cache is keyed by content, tokenizer, template and code (data.cache: false)",
    "dataset_config_hash": "the cache is keyed by content, tokenizer, template and code",
    "overwrite_cache": "the cache is keyed by content, tokenizer, template and code",
    "dataset_mix_dir": "the mix is recorded in the run directory's data report",
    "timeout": "no collective timeout to set",
    "fused_optimizer": "AdamW is fused where torch can",
    "try_launch_beaker_eval_jobs": "Ai2's Beaker evaluation jobs",
    "try_auto_save_to_beaker": "Ai2's Beaker storage",
    "hf_metadata_dataset": "Ai2's evaluation metadata",
    "oe_eval_tasks": "Ai2's OLMES evaluation jobs",
    "oe_eval_max_length": "Ai2's OLMES evaluation jobs",
    "gs_bucket_path": "Ai2's Google Storage upload",
    "cache_dataset_only": "`sftlab prepare CONFIG` tokenizes and caches without training",
    "hf_entity": "train.hub_model_id names the repository in full",
    "hf_repo_revision": "train.hub_revision",
    "hf_repo_url": "set by the Hub",
    "sync_each_batch": "gradients are synchronised once per optimizer step",
    "with_tracking": "train.report_to chooses the trackers",
}
NOT_SUPPORTED = {
    "config_name": "the model's own config.json is used",
    "load_balancing_loss": "no MoE auxiliary loss",
    "load_balancing_weight": "no MoE auxiliary loss",
}
# open-instruct's FlatArguments defaults where they differ from sftlab's and change results
DEFAULTS = {
    "train.num_epochs": 2.0,
    "optim.lr": 2e-5,
    "optim.warmup_ratio": 0.03,
    "optim.max_grad_norm": None,
    "train.micro_batch_size": 8,
    "data.on_overlength": "truncate",
    "checkpoint.keep_last": 3,
}
REDUCE_LOSS_NOTE = (
    "# note: reduce_loss={value}: open-instruct {how}; sftlab divides the step's summed loss by the "
    "step's target-token count over all micro-batches and processes (train.loss_normalization: tokens; "
    "docs/migrating.md, loss normalisation)"
)


def read(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The YAML file finetune.py reads, or the flags of the command (or script) that launches it."""
    if path.suffix in (".yaml", ".yml", ".json"):
        raw = read_mapping(path)
    else:
        launcher, script = command_tokens(path)
        raw = argparse_flags(script)
        raw["__launcher__"] = argparse_flags(launcher)
    for override in overrides:
        hydra_override(raw, override)
    return raw


def datasets(c: v.Conversion, raw: dict[str, Any]) -> None:
    """dataset_name, dataset_mixer (a mapping) and dataset_mixer_list (name, weight, name, weight, ...)
    with their splits become sources; a weight of 1.0 is the whole dataset, a fraction or count samples."""
    splits = raw.get("dataset_mixer_list_splits") or ["train"]
    splits = splits if isinstance(splits, list) else [splits]
    pairs: list[tuple[str, Any]] = []
    if raw.get("dataset_name"):
        pairs.append((raw["dataset_name"], 1.0))
    if isinstance(raw.get("dataset_mixer"), dict):
        pairs += list(raw["dataset_mixer"].items())
    mixer_list = raw.get("dataset_mixer_list")
    if mixer_list:
        items = mixer_list if isinstance(mixer_list, list) else [mixer_list]
        items = items + [1.0] if len(items) % 2 else items
        pairs += list(zip(items[0::2], items[1::2]))
    if raw.get("train_file"):
        pairs.append((raw["train_file"], 1.0))
    for i, (name, weight) in enumerate(pairs):
        weight = v.number(weight)
        src = {"path": str(name), "split": splits[min(i, len(splits) - 1)], "weight": weight}
        src["weight"] = None if weight in (1, 1.0) else weight
        src["subset"] = raw.get("dataset_config_name")
        c.sources.append(src)
    if pairs and any("/" in str(n) and not Path(str(n)).exists() for n, _ in pairs):
        c.notes.append(HUB_NOTE)


def max_samples(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if len(c.sources) != 1:
        return c.skip(key, value, "set data.train.N.weight (an integer count) per source")
    c.sources[0]["weight"] = int(value)
    c.notes.append(f"# note: max_train_samples={value} is the source's weight (a count of examples)")


def clip(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    value = v.number(value)
    c.set("optim.max_grad_norm", value if isinstance(value, (int, float)) and value > 0 else None)


def flash(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.set("model.attn_implementation", "flash_attention_2")


def lora(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.peft_on = True
        c.peft.setdefault("method", "lora")
        if key == "use_qlora":
            c.set_peft("quantize", "nf4")


def eight_bit(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.set("optim.name", "adamw_8bit")


def checkpointing(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if str(value) == "epoch":
        c.set("checkpoint.every_epoch", True)
    elif str(value).isdigit() and int(value) > 0:
        c.set("checkpoint.every_steps", int(value))
    else:
        c.skip(key, value, "an integer step count or 'epoch'")


def keep_last(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    value = int(v.number(value))
    c.set("checkpoint.keep_last", None if value < 0 or value > 10**6 else value)


def reduce_loss(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    """mean (open-instruct's default): each micro-batch's mean, averaged: train.loss_normalization:
    micro_batch_mean. sum: undivided, which no normalisation reproduces: sftlab's token mean, with a note."""
    if str(value) == "mean":
        return c.set("train.loss_normalization", "micro_batch_mean")
    how = "sums the loss over tokens, undivided (the gradient grows with the tokens of the step)"
    c.notes.append(REDUCE_LOSS_NOTE.format(value=value, how=how))


def launcher(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    """`accelerate launch` flags: the precision, and how to launch the same engine with sftlab."""
    if value.get("mixed_precision") in ("bf16", "fp16", "no"):
        c.set("train.mixed_precision", value["mixed_precision"])
    ds = str(value.get("deepspeed_config_file") or value.get("config_file") or "")
    if value.get("use_deepspeed") or "zero" in ds or "stage" in ds:
        stage = "3" if ("stage3" in ds or "zero3" in ds) else "2"
        c.notes.append(
            f"# note: launched with DeepSpeed ({ds or 'use_deepspeed'}): accelerate launch --config_file "
            f"configs/accelerate/deepspeed_zero{stage}.yaml -m sftlab.cli train CONFIG"
        )
    processes = value.get("num_processes")
    if isinstance(processes, int) and isinstance(raw.get("per_device_train_batch_size", 8), int):
        per_step = processes * int(raw.get("per_device_train_batch_size", 8))
        per_step *= int(raw.get("gradient_accumulation_steps", 1))
        c.set("train.global_batch_size", per_step)  # the accumulation follows the processes of each launch
        c.tree.get("train", {}).pop("grad_accum_steps", None)
        c.notes.append(
            f"# note: {processes} processes x micro-batch x accumulation = {per_step} examples per optimizer "
            "step: train.global_batch_size, whatever the number of processes"
        )


HANDLERS = {
    "clip_grad_norm": clip,
    "max_train_samples": max_samples,
    "use_flash_attn": flash,
    "use_lora": lora,
    "use_qlora": lora,
    "lora_rank": v.peft_value,
    "lora_alpha": v.peft_value,
    "lora_dropout": v.peft_value,
    "use_8bit_optimizer": eight_bit,
    "lr_scheduler_type": v.scheduler,
    "final_lr_ratio": lambda c, k, x, raw: c.set("optim.min_lr_ratio", v.number(x)),
    "max_train_steps": v.positive("train.max_steps"),
    "logging_steps": v.positive("train.log_every"),
    "checkpointing_steps": checkpointing,
    "keep_last_n_checkpoints": keep_last,
    "clean_checkpoints_at_end": lambda c, k, x, raw: c.set("checkpoint.delete_at_end", bool(x)),
    "resume_from_checkpoint": v.resume,
    "report_to": v.report_to,
    "save_to_hub": lambda c, k, x, raw: c.set("train.hub_model_id", str(x)),
    "hf_repo_id": lambda c, k, x, raw: c.set("train.hub_model_id", str(x)),
    "tokenizer_name": lambda c, k, x, raw: c.set("model.tokenizer", str(x)),
    "tokenizer_name_or_path": lambda c, k, x, raw: c.set("model.tokenizer", str(x)),
    "tokenizer_revision": lambda c, k, x, raw: c.set("model.tokenizer_revision", str(x)),
    "chat_template_name": v.chat_template,
    "add_bos": lambda c, k, x, raw: c.set("data.add_bos", bool(x)),
    "dataset_local_cache_dir": lambda c, k, x, raw: c.set("data.cache_dir", str(x)),
    "low_cpu_mem_usage": lambda c, k, x, raw: x and c.set("model.init_kwargs.low_cpu_mem_usage", True),
    "additional_model_arguments": lambda c, k, x, raw: x and c.set("model.init_kwargs", dict(x)),
    "packing": v.packing,
    "padding_free": v.packing,
    "reduce_loss": reduce_loss,
    "exp_name": lambda c, k, x, raw: c.set("train.run_name", str(x)),
    "run_name": lambda c, k, x, raw: c.set("train.run_name", str(x)),
    "wandb_project_name": lambda c, k, x, raw: c.set("train.project", str(x)),
    "wandb_entity": lambda c, k, x, raw: c.set("train.entity", str(x)),
    "__launcher__": launcher,
}
CONSUMED = {
    "dataset_name",
    "dataset_mixer",
    "dataset_mixer_list",
    "dataset_mixer_list_splits",
    "dataset_config_name",
    "train_file",
}


def finish(c: v.Conversion, raw: dict[str, Any]) -> None:
    if "reduce_loss" not in raw:  # its default, mean
        c.set("train.loss_normalization", "micro_batch_mean")
        c.notes.append(
            "# note: train.loss_normalization: micro_batch_mean is open-instruct's default (reduce_loss: mean)"
        )
