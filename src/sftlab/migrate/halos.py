"""`sftlab convert-config --from halos`: a HALOs (ContextualAI/HALOs) SFT run, given as its Hydra
`config/config.yaml` plus the command line's overrides (`loss=sft model=llama datasets=[ultrachat]
++model.name_or_path=... ++lr=1e-5`), or as the shell script that runs `launch.py`/`train.py` (its
`config/` directory found beside the script). The `defaults:` groups (`model`, `loss`) are composed as
Hydra does, `${...}` interpolations resolved, then the dotted names converted."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import sftlab.migrate.values as v
from sftlab.config.schema import ConfigError
from sftlab.migrate.readers import (
    command_tokens,
    flatten,
    hydra_override,
    read_mapping,
    resolve_interpolations,
)

# HALOs dataloader names with a public hub dataset sftlab reads as it is (SFT on the chosen replies)
DATASETS = {
    "ultrachat": {"path": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "format": "messages"},
    "ultrabin": {
        "path": "HuggingFaceH4/ultrafeedback_binarized",
        "split": "train_prefs",
        "format": "messages",
        "columns": {"messages": "chosen"},
    },
}
NOT_NEEDED = {
    "mode": "sftlab train trains; `sftlab eval` and `sftlab generate` evaluate and sample",
    "debug": "trackers and checkpoints follow train.report_to and checkpoint.*",
    "cache_dir": "models and datasets are cached by Hugging Face (HF_HOME)",
    "minimum_log_interval_secs": "train.log_every is in steps",
    "trainer": "sftlab's loop is the SFT trainer; the engine comes from accelerate launch",
    "use_fsdp": "the engine comes from accelerate launch (configs/accelerate/fsdp.yaml)",
    "fsdp_port": "the engine comes from accelerate launch",
    "loss.trainer": "sftlab trains SFT",
    "loss.dataloader": "sftlab reads and masks the rows itself",
    "loss.name": "sftlab trains SFT",
    "model.block_name": "FSDP wraps the model's own decoder layers",
    "model.reference_dtype": "SFT has no reference model",
    "model.v_head_max_grad_norm": "SFT has no value head",
    "model.eval_batch_size": "evaluation uses train.micro_batch_size",
    "model.eval_microbatch_size": "evaluation uses train.micro_batch_size",
    "model.policy_online": "SFT trains offline",
    "model.policy_online_update_steps": "SFT trains offline",
    "cache_reference_logprobs": "SFT has no reference model",
    "load_reference_logprobs": "SFT has no reference model",
    "frac_unique_desirable": "SFT trains on every row",
    "frac_unique_undesirable": "SFT trains on every row",
    "n_samples": "`sftlab generate` samples after training",
    "samples_dir": "`sftlab generate` samples after training",
    "saved_policy": "`sftlab generate RUN_DIR` reads the run's model",
    "top_p": "`sftlab generate` takes its sampling settings",
}
TURN_MARKERS = ("human_prefix", "assistant_prefix", "human_suffix", "assistant_suffix")
DEFAULTS = {
    "optim.scheduler": "constant",
    "optim.weight_decay": 0.0,
    "optim.warmup_ratio": 0.0,
    "train.loss_normalization": "micro_batch_mean",  # HALOs' SFT loss: each micro-batch's mean, averaged
}


def read(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The composed Hydra config, flattened to dotted names."""
    if path.suffix in (".yaml", ".yml"):
        config = path
    else:
        overrides = command_tokens(path)[1] + list(overrides)
        config = path.parent / "config" / "config.yaml"
        if not config.is_file():
            raise ConfigError(
                f"{path}: HALOs' config/config.yaml is not beside the script; run "
                "`sftlab convert-config HALOs/config/config.yaml --from halos` followed by the script's overrides"
            )
    tree = read_mapping(config)
    choices = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if "=" in o and o[0] not in "+~"}
    for entry in tree.pop("defaults", []) or []:
        if isinstance(entry, dict):
            ((group, choice),) = entry.items()
            choice = choices.pop(group, choice)
            tree[group] = _merged(tree.get(group) or {}, _group(config.parent / group, str(choice)))
    for override in overrides:
        if override.split("=", 1)[0].lstrip("+") not in ("model", "loss") or override[0] == "+":
            hydra_override(tree, override)
    return flatten(resolve_interpolations(tree))


def _group(directory: Path, choice: str) -> dict[str, Any]:
    """A Hydra group option (`model/llama.yaml`), its own `defaults:` (e.g. `base_model`) merged under it."""
    if choice == "???":
        raise ConfigError(
            f"HALOs needs {directory.name}=NAME (e.g. {directory.name}=sft): it is '???' in the config"
        )
    tree = read_mapping(directory / f"{choice}.yaml")
    merged: dict[str, Any] = {}
    for entry in tree.pop("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_":
            merged = _merged(merged, _group(directory, entry))
    return _merged(merged, tree)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = (
            _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def datasets(c: v.Conversion, raw: dict[str, Any]) -> None:
    loss = str(raw.get("loss.name") or raw.get("loss.trainer") or "sft").lower()
    if loss not in ("sft", "sfttrainer"):
        raise ConfigError(f"loss={loss}: sftlab trains SFT only (HALOs' loss=sft converts)")
    for key, target in (
        ("datasets", c.sources),
        ("train_datasets", c.sources),
        ("test_datasets", c.eval_sources),
    ):
        names = raw.get(key) or []
        for name in names if isinstance(names, list) else [names]:
            if str(name) in DATASETS:
                target.append(dict(DATASETS[str(name)]))
            else:
                c.skip(
                    f"{key} {name}",
                    name,
                    "built by HALOs' dataloader.py; give its rows as a local file "
                    "in a format of docs/data.md (messages, prompt/completion, ...)",
                )


def _batch(raw: dict[str, Any]) -> tuple[int, int]:
    """(examples per optimizer step over all processes, accumulation steps) as HALOs reads them."""
    return int(raw.get("model.batch_size") or 32), int(raw.get("model.gradient_accumulation_steps") or 1)


def batch_size(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    """HALOs' batch_size is per optimizer step over all processes: train.global_batch_size; the micro-batch
    is batch_size / accumulation on one process (HALOs divides by the processes too: on N processes set
    train.micro_batch_size to batch_size / (accumulation x N))."""
    per_step, accum = _batch(raw)
    micro = raw.get("model.microbatch_size") or max(1, per_step // accum)
    c.set("train.global_batch_size", per_step)
    c.set("train.micro_batch_size", int(micro))


def examples_to_steps(target: str):
    def apply(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
        if isinstance(v.number(value), (int, float)) and value > 0:
            c.set(target, max(1, math.ceil(value / _batch(raw)[0])))
            c.notes.append(
                f"# note: {key}={value} examples is {target} in optimizer steps of {_batch(raw)[0]}"
            )

    return apply


def intermediate(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.set("checkpoint.every_steps", max(1, int(raw.get("eval_every") or 20000) // _batch(raw)[0]))


def optimizer(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if str(value) in ("Adam", "AdamW"):
        c.set("optim.name", "adamw")
    else:
        c.skip(key, value, "optim.name: adamw, adamw_8bit, paged_adamw_8bit, adafactor, sgd")


def policy_dtype(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if str(value) in ("bfloat16", "float16"):
        c.set("train.mixed_precision", "bf16" if value == "bfloat16" else "fp16")
        c.notes.append(f"# note: {key}={value}: sftlab computes in it and keeps fp32 master weights")


def load_from(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if str(value).endswith(".pt"):
        return c.skip(key, value, "a HALOs policy.pt; sftlab loads Hugging Face model directories")
    c.set("model.name_or_path", str(value))


def prefix(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if key == "human_prefix":
        c.skip(
            "human_prefix/assistant_prefix",
            f"{value!r}",
            "HALOs' own turn markers; sftlab renders with "
            "the tokenizer's chat template or data.chat_template (tulu's turns are <|user|> / <|assistant|>)",
        )


def wandb(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if key == "wandb.enabled":
        return c.set("train.report_to", ["wandb"] if value is True else [])
    if value:
        c.set("train.project" if key == "wandb.project" else "train.entity", str(value))


def peft_on(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.peft_on = True
        c.peft.setdefault("method", "lora")


def to(target: str, convert=v.number):
    return lambda c, key, value, raw: c.set(target, convert(value))


HANDLERS = {
    "seed": to("train.seed", int),
    "exp_name": to("train.run_name", str),
    "do_first_eval": to("train.eval_on_start", bool),
    "lr": to("optim.lr"),
    "n_epochs": to("train.num_epochs", float),
    "n_examples": examples_to_steps("train.max_steps"),
    "n_eval_examples": examples_to_steps("train.eval_max_batches"),
    "eval_every": examples_to_steps("train.eval_every"),
    "intermediate_checkpoints": intermediate,
    "optimizer": optimizer,
    "warmup_steps": to("optim.warmup_steps", int),
    "local_run_dir": to("train.output_dir", str),
    "wandb.enabled": wandb,
    "wandb.project": wandb,
    "wandb.entity": wandb,
    "model.name_or_path": to("model.name_or_path", str),
    "model.tokenizer_name_or_path": to("model.tokenizer", str),
    "model.load_from": load_from,
    "model.from_checkpoint": to("train.resume", str),
    "model.policy_dtype": policy_dtype,
    "model.max_grad_norm": to("optim.max_grad_norm"),
    "model.max_length": to("data.max_seq_length", int),
    "model.activation_checkpointing": to("train.gradient_checkpointing", bool),
    "model.batch_size": batch_size,
    "model.gradient_accumulation_steps": lambda c, k, x, raw: None,
    "model.microbatch_size": lambda c, k, x, raw: None,
    "model.attn_implementation": v.attention,
    "model.use_flash_attention": lambda c, k, x, raw: (
        x and c.set("model.attn_implementation", "flash_attention_2")
    ),
    "model.use_peft": peft_on,
    "model.peft.lora_r": lambda c, k, x, raw: c.set_peft("r", int(x)),
    "model.peft.lora_alpha": lambda c, k, x, raw: c.set_peft("alpha", float(x)),
    "model.peft.lora_dropout": lambda c, k, x, raw: c.set_peft("dropout", float(x)),
    "model.peft.target_modules": lambda c, k, x, raw: c.set_peft("target_modules", x),
    **{name: prefix for name in TURN_MARKERS},
}
CONSUMED = {"datasets", "train_datasets", "test_datasets", "defaults"}
PREFIXES_NOT_NEEDED = {
    "model.reward_model.": "SFT has no reward model",
    "loss.": "SFT's loss has no parameters",
}
NOT_SUPPORTED = {
    "humanline": "a HALOs alignment option, not SFT",
    "humanline_alpha": "a HALOs alignment option, not SFT",
    "model.max_prompt_length": "sftlab keeps whole prompts; data.on_overlength decides for long rows",
    "model.load_lora_from": "continue an adapter with model.name_or_path: ADAPTER_DIR",
}


def finish(c: v.Conversion, raw: dict[str, Any]) -> None:
    if "model.batch_size" not in raw:
        batch_size(c, "model.batch_size", 32, raw)
