"""The value converters of `sftlab convert-config`: one foreign key's value -> sftlab keys (or a comment
saying why it has no counterpart), and the Conversion they write into."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from sftlab.config.overrides import set_dotted

PEFT_SAME = {
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_rslora": "use_rslora",
    "peft_use_rslora": "use_rslora",
    "lora_target_modules": "target_modules",
    "lora_modules_to_save": "modules_to_save",
}


class Conversion:
    """The sftlab tree being built, the notes and the keys left out."""

    def __init__(self, tool: str, base: Path):
        self.tool, self.base = tool, base
        self.tree: dict[str, Any] = {}
        self.sources: list[dict[str, Any]] = []
        self.eval_sources: list[dict[str, Any]] = []
        self.peft: dict[str, Any] = {}
        self.peft_on = False
        self.notes: list[str] = []
        self.skipped: list[str] = []
        self.seen: set[str] = set()
        self.current: str | None = None  # the foreign key being converted
        self.mapped: dict[str, list[str]] = {}  # foreign key -> the sftlab keys it set

    def set(self, key: str, value: Any) -> None:
        set_dotted(self.tree, key, value)
        self.seen.add(key)
        self._record(key)

    def set_peft(self, name: str, value: Any) -> None:
        self.peft[name] = value
        self._record(f"peft.{name}")

    def _record(self, key: str) -> None:
        if self.current is not None and key not in self.mapped.setdefault(self.current, []):
            self.mapped[self.current].append(key)

    def skip(self, key: str, value: Any, why: str, kind: str = "not converted") -> None:
        self.skipped.append(f"# {kind}: {key}={short(value)} ({why})")


def short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def number(value: Any) -> Any:
    """YAML 1.1 reads 2e-5 as a string; the tools read it as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


SCHEDULERS = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
    "cosine_with_min_lr": "cosine",
    "warmup_stable_decay": None,
}
OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_hf": "adamw",
    "adamw": "adamw",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "adafactor": "adafactor",
    "sgd": "sgd",
}
TRACKERS = ("tensorboard", "wandb", "trackio")
ATTENTION = {
    "flash_attention_2": "flash_attention_2",
    "sdpa": "sdpa",
    "eager": "eager",
    "fa2": "flash_attention_2",
    "flash": "flash_attention_2",
    "sdp": "sdpa",
    "auto": None,
    "disabled": "eager",
}


def scheduler(c: Conversion, key: str, value: Any, raw: dict) -> None:
    name = SCHEDULERS.get(str(value))
    if name is None:
        return c.skip(key, value, "sftlab schedules: linear, cosine, constant")
    c.set("optim.scheduler", name)
    kwargs = raw.get("lr_scheduler_kwargs") or {}
    if isinstance(kwargs, dict) and "min_lr_rate" in kwargs:
        c.set("optim.min_lr_ratio", number(kwargs["min_lr_rate"]))


def optimizer(c: Conversion, key: str, value: Any, raw: dict) -> None:
    name = OPTIMIZERS.get(str(value))
    if name is None:
        return c.skip(key, value, "optim.name: adamw, adamw_8bit, paged_adamw_8bit, adafactor, sgd")
    c.set("optim.name", name)


def betas(c: Conversion, key: str, value: Any, raw: dict) -> None:
    beta1 = number(raw.get("adam_beta1", 0.9) or 0.9)
    beta2 = number(raw.get("adam_beta2", 0.999) or 0.999)
    c.set("optim.betas", [beta1, beta2])


def precision(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.set("train.mixed_precision", key)
    elif str(value) == "auto":
        c.set("train.mixed_precision", "auto")
    elif value is False and not raw.get("bf16") and not raw.get("fp16"):
        c.set("train.mixed_precision", "no")


def dtype(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value in ("float32", "bfloat16", "float16", "auto"):
        c.set("model.dtype", value)
    else:
        c.skip(key, value, "model.dtype: float32, bfloat16, float16, auto")


def attention(c: Conversion, key: str, value: Any, raw: dict) -> None:
    on = "sdpa" if key == "sdp_attention" else "flash_attention_2"
    name = on if value is True else ATTENTION.get(str(value), "?")
    if value is False or name is None:
        return None
    if name == "?":
        return c.skip(key, value, "model.attn_implementation: sdpa, eager, flash_attention_2")
    c.set("model.attn_implementation", name)


def positive(target: str) -> Callable:
    def apply(c: Conversion, key: str, value: Any, raw: dict) -> None:
        value = number(value)
        if isinstance(value, (int, float)) and value > 0:
            if isinstance(value, float) and not value.is_integer():
                return c.skip(key, value, f"a fraction of the run; {target} is a step count")
            c.set(target, int(value))

    return apply


def eval_strategy(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value == "steps":
        c.set("train.eval_every", int(raw.get("eval_steps") or raw.get("logging_steps") or 500))
    elif value == "epoch":
        c.set("train.eval_every", "epoch")


def save_strategy(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value == "steps":
        c.set("checkpoint.every_steps", int(raw.get("save_steps") or 500))
    elif value == "epoch":
        c.set("checkpoint.every_epoch", True)


def save_steps(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if raw.get("save_strategy", "steps") == "steps" and isinstance(value, (int, float)) and value >= 1:
        c.set("checkpoint.every_steps", int(value))


def report_to(c: Conversion, key: str, value: Any, raw: dict) -> None:
    wanted = [value] if isinstance(value, str) else list(value or [])
    wanted = list(TRACKERS) if wanted == ["all"] else [w for w in wanted if w != "none"]
    kept = [w for w in wanted if w in TRACKERS]
    if kept:
        c.set("train.report_to", kept)
    if set(wanted) - set(kept):
        c.skip(key, sorted(set(wanted) - set(kept)), "trackers: tensorboard, wandb, trackio")


def resume(c: Conversion, key: str, value: Any, raw: dict) -> None:
    c.set("train.resume", "auto" if value is True else str(value))


def peft_value(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if key in ("lora_target", "additional_target") and isinstance(value, str):
        value = "all-linear" if value == "all" else [m.strip() for m in value.split(",")]
    if key == "lora_target_linear":
        if value is True:
            c.set_peft("target_modules", "all-linear")
        return None
    if key == "lora_target_modules" and raw.get("lora_target_linear") is True:
        return c.skip(
            key, value, "lora_target_linear: true takes every linear layer (all-linear)", kind="not needed"
        )
    c.set_peft(
        {"lora_target": "target_modules", "additional_target": "modules_to_save"}.get(
            key, PEFT_SAME.get(key, key)
        ),
        value,
    )


def peft_on(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value in (True, "lora", "qlora") or (key == "use_dora" and value):
        c.peft_on = True
        c.set_peft("method", c.peft.get("method", "lora"))
    if value is True and key in ("use_dora", "peft_use_dora"):
        c.set_peft("method", "dora")
    if value in ("full", "freeze", "oft"):
        if value != "full":
            c.skip(key, value, "sftlab trains all weights or LoRA/DoRA adapters")
    elif value not in (True, False, "lora", "qlora"):
        c.skip(key, value, "peft.method: lora, dora")


def quantize(c: Conversion, key: str, value: Any, raw: dict) -> None:
    bits = {"load_in_4bit": 4, "load_in_8bit": 8}.get(key, value if key == "quantization_bit" else None)
    if key in ("load_in_4bit", "load_in_8bit") and value is not True:
        return None
    if bits in (4, 8):
        c.set_peft("quantize", "nf4" if bits == 4 else "int8")
    else:
        c.skip(key, value, "peft.quantize: nf4 (4 bits) or int8")


def loss(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if key in ("assistant_only_loss", "completion_only_loss"):
        if value is True:
            c.set("data.loss_on", "assistant")
        elif value is False:
            c.set("data.loss_on", "all")
    elif key in ("train_on_inputs", "train_on_prompt") and value is True:
        c.set("data.loss_on", "all")
    elif key == "mask_history" and value is True:
        c.set("data.loss_on", "last_assistant")


def packing(c: Conversion, key: str, value: Any, raw: dict) -> None:
    strategy = raw.get("packing_strategy", "bfd")
    if value is True:
        c.set("data.packing", "wrapped" if strategy == "wrapped" else "bfd")
        if strategy not in ("bfd", "wrapped"):
            c.skip("packing_strategy", strategy, "data.packing: bfd or wrapped; bfd used")


def chat_template(c: Conversion, key: str, value: Any, raw: dict) -> None:
    value = str(value)
    if value.endswith(".jinja") or value in (
        "chatml",
        "llama3",
        "tulu",
        "zephyr",
        "alpaca",
        "chatml_tools",
        "llama3_tools",
    ):
        c.set("data.chat_template", value)
    elif "{%" in value or "{{" in value:
        c.skip(key, "<inline Jinja>", "save it as a .jinja file and set data.chat_template: FILE")
    elif value in ("default", "tokenizer_default", "empty") or value.startswith(
        ("qwen", "llama3_", "mistral", "gemma")
    ):
        c.skip(key, value, "data.chat_template: null uses the tokenizer's own template", kind="not needed")
    else:
        c.skip(
            key,
            value,
            "built-ins: chatml, llama3, tulu, zephyr, alpaca, chatml_tools, llama3_tools, or a .jinja file",
        )


def saves_per_epoch(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value == 1:
        c.set("checkpoint.every_epoch", True)
    else:
        c.skip(key, value, "checkpoint.every_epoch saves once per epoch; checkpoint.every_steps for more")


def wandb(c: Conversion, key: str, value: Any, raw: dict) -> None:
    """axolotl's wandb_project / wandb_entity / wandb_name (a project turns wandb on)."""
    target = {"wandb_project": "train.project", "wandb_entity": "train.entity"}.get(key, "train.run_name")
    c.set(target, str(value))
    if key == "wandb_project":
        c.set("train.report_to", ["wandb"])


def overlength(c: Conversion, key: str, value: Any, raw: dict) -> None:
    if value in ("drop", "truncate"):
        c.set("data.on_overlength", value)
    else:
        c.skip(key, value, "data.on_overlength: drop, truncate, error")


def best_metric(c: Conversion, key: str, value: Any, raw: dict) -> None:
    """transformers' metric_for_best_model (`loss`, `eval_loss`, `eval_<name>_loss`) -> train.metric_for_best."""
    name = str(value).removeprefix("eval_")
    if name == "loss":
        c.set("train.metric_for_best", "eval_loss")
    elif name.endswith("_loss"):
        c.set("train.metric_for_best", f"eval/{name}")
    else:
        return c.skip(
            key, value, "train.metric_for_best picks the lowest eval loss (eval_loss or eval/<name>_loss)"
        )
    if raw.get("greater_is_better") is True:
        c.skip("greater_is_better", True, "the best step is the one with the lowest loss")
