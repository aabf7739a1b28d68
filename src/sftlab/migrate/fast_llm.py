"""`sftlab convert-config --from fast-llm`: a Fast-LLM training config (`fast-llm train gpt --config`, both
the `batch:` layout of the SFT guide and the newer `data.micro_batch_size` one) or its `fast-llm prepare`
config. Fast-LLM nests its keys; they are read as dotted names, with the names a user chooses (an
evaluator's, a dataset's) read as `*`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import sftlab.migrate.values as v
from sftlab.migrate.readers import flatten, hydra_override, read_mapping

NAMED = re.compile(r"^(training\.evaluators|data\.datasets)\.[^.]+\.")
NOT_NEEDED = {
    "pretrained.format": "Hugging Face checkpoints are detected",
    "pretrained.model_weights": "the pretrained weights are loaded",
    "training.test_iters": "sftlab has no test phase; `sftlab eval` scores any set afterwards",
    "training.num_workers": "batches come from memory-mapped arrays",
    "training.evaluators.*.evaluator.type": "validation computes the loss",
    "training.export.format": "checkpoint.save_hf_model writes a Hugging Face model",
    "model.base_model.cross_entropy_impl": "the target-only loss head (train.loss_head) is fused where it can",
    "model.distributed.timeout": "no collective timeout to set",
    "batch.cross_document_attention": "packed documents never attend to each other",
    "data.fim": "no fill-in-the-middle in SFT",
    "data.sampling.use_loss_masking_spans": "`text` rows use their loss_masking_spans field",
    "output_path": "data.cache_dir holds the tokenized data, keyed by content, tokenizer and template",
    "loading_workers": "data.num_proc tokenizes in parallel",
    "saving_workers": "data.num_proc tokenizes in parallel",
    "dataset.trust_remote_code": "datasets are loaded without remote code",
    "splits.training": "the rest of data.eval_fraction",
}
DEFAULTS: dict[str, Any] = {}


def read(path: Path, overrides: list[str]) -> dict[str, Any]:
    tree = read_mapping(path)
    for override in overrides:
        hydra_override(tree, override)
    flat = flatten(tree)
    raw = {NAMED.sub(lambda m: m.group(1) + ".*.", k): x for k, x in flat.items()}
    named = (k.split(".") for k in flat if k.startswith("data.datasets.") and k.endswith(".path"))
    raw["__datasets__"] = {p[2]: flat[".".join(p)] for p in named if len(p) == 4}
    return raw


def _source(c: v.Conversion, key: str, path: Any) -> dict[str, Any] | None:
    path = str(path)
    if re.search(r"fast_llm_config[^/]*\.ya?ml$", path):
        c.skip(
            key,
            path,
            "Fast-LLM's prepared memory-mapped dataset; point data.train at the dataset "
            "`fast-llm prepare` read (its dataset.path): sftlab tokenizes and masks it itself",
        )
        return None
    return {"path": path}


def datasets(c: v.Conversion, raw: dict[str, Any]) -> None:
    """Training config: `data.datasets.<name>.path`, the evaluators' `dataset_name`s being eval sets.
    Prepare config: `dataset.path` with its text and span fields."""
    evaluated = {str(x).lower() for k, x in raw.items() if k.endswith("evaluator.dataset_name")} | {
        "validation"
    }
    for name, path in raw["__datasets__"].items():
        src = _source(c, f"data.datasets.{name}.path", path)
        if src is not None:
            (c.eval_sources if name.lower() in evaluated else c.sources).append(src)
    if raw.get("dataset.path"):
        columns = {
            "text": raw.get("dataset.field"),
            "loss_masking_spans": raw.get("dataset.loss_masking_spans"),
        }
        c.sources.append(
            {
                "path": str(raw["dataset.path"]),
                "format": "text",
                "split": raw.get("dataset.split"),
                "subset": raw.get("dataset.config_name"),
                "columns": {k: x for k, x in columns.items() if x and x != k},
            }
        )


def flash(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if value is True:
        c.set("model.attn_implementation", "flash_attention_2")


def dtype(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    name = {
        "bf16": "bf16",
        "bfloat16": "bf16",
        "fp16": "fp16",
        "float16": "fp16",
        "fp32": "no",
        "float32": "no",
    }
    if str(value) in name:
        c.set("train.mixed_precision", name[str(value)])
    else:
        c.skip(key, value, "train.mixed_precision: bf16, fp16 or no")


def zero(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    stage = int(value or 0)
    if stage:
        c.notes.append(
            f"# note: {key}: {stage}: launch with DeepSpeed ZeRO: accelerate launch --config_file "
            f"configs/accelerate/deepspeed_zero{3 if stage == 3 else 2}.yaml -m sftlab.cli train CONFIG"
        )


def truncation(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    c.set("data.packing", "wrapped" if value is True else "bfd")


def lr_minimum(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    base = v.number(raw.get("optimizer.learning_rate.base") or 0)
    value = v.number(value)
    if base and isinstance(value, (int, float)):
        c.set("optim.min_lr_ratio", round(value / base, 12))


def decay_iterations(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    if v.number(value) != v.number(raw.get("training.train_iters")):
        c.skip(key, value, "the decay ends at the last step (train.max_steps)")


def betas(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    c.set(
        "optim.betas",
        [v.number(raw.get("optimizer.beta_1", 0.9)), v.number(raw.get("optimizer.beta_2", 0.999))],
    )


def schedule(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant"}.get(str(value))
    if name is None:
        return c.skip(key, value, "sftlab schedules: linear, cosine, constant")
    c.set("optim.scheduler", name)


def global_batch(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    """Sequences (packed rows) per optimizer step over all processes."""
    c.set("train.global_batch_size", int(value))


def split(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    parts = [float(x) for x in value] if isinstance(value, list) else []
    if len(parts) >= 2 and sum(parts) > 0 and parts[1] > 0:
        c.set("data.eval_fraction", round(parts[1] / sum(parts), 6))


def value_to(target: str, convert=v.number):
    return lambda c, key, value, raw: c.set(target, convert(value))


def wandb(c: v.Conversion, key: str, value: Any, raw: dict) -> None:
    c.set("train.report_to", ["wandb"])
    c.set("train.project" if key.endswith("project_name") else "train.entity", str(value))


HANDLERS = {
    "pretrained.path": value_to("model.name_or_path", str),
    "tokenizer.path": value_to("model.tokenizer", str),
    "training.train_iters": v.positive("train.max_steps"),
    "training.logs.interval": v.positive("train.log_every"),
    "training.evaluators.*.interval": v.positive("train.eval_every"),
    "training.evaluators.*.evaluator.iterations": v.positive("train.eval_max_batches"),
    "training.validation.interval": v.positive("train.eval_every"),
    "training.validation.iterations": v.positive("train.eval_max_batches"),
    "training.checkpoint.interval": v.positive("checkpoint.every_steps"),
    "training.checkpoint.keep": value_to("checkpoint.keep_last", int),
    "training.export.interval": lambda c, k, x, raw: c.set("checkpoint.save_hf_model", True),
    "training.wandb.project_name": wandb,
    "training.wandb.entity_name": wandb,
    "batch.micro_batch_size": value_to("train.micro_batch_size", int),
    "batch.sequence_length": value_to("data.max_seq_length", int),
    "batch.batch_size": global_batch,
    "data.micro_batch_size": value_to("train.micro_batch_tokens", int),
    "data.maximum_document_length": value_to("data.max_seq_length", int),
    "data.truncate_documents": truncation,
    "data.truncations": truncation,
    "data.split": split,
    "splits.validation": value_to("data.eval_fraction", float),
    "tokenize_workers": value_to("data.num_proc", int),
    "optimizer.learning_rate.base": value_to("optim.lr"),
    "optimizer.learning_rate.minimum": lr_minimum,
    "optimizer.learning_rate.decay_style": schedule,
    "optimizer.learning_rate.warmup_iterations": value_to("optim.warmup_steps", int),
    "optimizer.learning_rate.decay_iterations": decay_iterations,
    "optimizer.weight_decay": value_to("optim.weight_decay"),
    "optimizer.beta_1": betas,
    "optimizer.beta_2": betas,
    "optimizer.epsilon": value_to("optim.eps"),
    "optimizer.gradient_norm_clipping": value_to("optim.max_grad_norm"),
    "model.base_model.transformer.use_flash_attention": flash,
    "model.base_model.decoder.block.mixer.use_flash_attention": flash,
    "model.multi_stage.zero_stage": zero,
    "model.distributed.training_dtype": dtype,
    "model.distributed.compute_dtype": dtype,
    "model.distributed.seed": value_to("train.seed", int),
    "run.experiment_dir": value_to("train.output_dir", str),
    "run.experiment_name": value_to("train.run_name", str),
}
CONSUMED = {
    "training.evaluators.*.evaluator.dataset_name",
    "dataset.path",
    "dataset.field",
    "dataset.loss_masking_spans",
    "dataset.split",
    "dataset.config_name",
    "data.datasets.*.path",
    "data.datasets.*.type",
    "__datasets__",
}
