"""`sftlab eval`: score a saved model (or a LoRA run directory) on a data file.

The file goes through the same pipeline as training data (any supported format, the model
directory's own chat template, the same assistant masks), so the loss is exactly the training
objective on new data: the mean NLL over target tokens, and its perplexity exp(loss). With
`match`, greedy replies to every conversation (all but its last assistant message) are compared
with that message (exact match after stripping whitespace), as the run's match evaluation does.

The model is anything `sftlab generate` takes (trainer/inference.py): `default`, a hub id, a model,
run or checkpoint directory. For a run directory (its config.yaml) or a checkpoint (the config in its
trainer_state.json) the run's data settings are used: `loss_on`, `max_seq_length`, `on_overlength`.
Otherwise the defaults. A vision-language model reads the file's rows with their images (paths
relative to the file) through the processor saved with it (docs/vision.md).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from sftlab.config.schema import ConfigError, DataConfig, MatchEvalConfig, SourceConfig
from sftlab.data.collate import pad_collate
from sftlab.data.dataset import build_datasets
from sftlab.data.locate import check_local_paths
from sftlab.data.vision import vision_collate
from sftlab.model.generate import exact_match, load_match_examples
from sftlab.trainer.inference import load_model_dir, model_processor, run_config
from sftlab.trainer.objective import SFTObjective

__all__ = ["evaluate", "load_model_dir", "target_loss"]


def _data_config(model_dir: Path, data: str, mapping: dict[str, dict[str, str]]) -> DataConfig:
    try:
        source = [SourceConfig(path=data, **mapping)]
    except ValidationError as e:
        raise ConfigError(
            "columns/roles: " + "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        ) from None
    cfg = run_config(model_dir)
    if cfg is not None:
        run = cfg.data
        return DataConfig(
            train=source,
            loss_on=run.loss_on,
            max_seq_length=run.max_seq_length,
            on_overlength=run.on_overlength,
            cache=False,
        )
    return DataConfig(train=source, cache=False)


def column_mapping(
    model_dir: Path, columns: dict[str, str] | None, roles: dict[str, str] | None
) -> tuple[dict[str, dict[str, str]], str]:
    """The `columns`/`roles` to read the eval file with, and where they come from: as given, else the
    run's own when all its training sources share one mapping (an eval file usually has the training
    file's schema), else none."""
    if columns is not None or roles is not None:
        return {"columns": columns or {}, "roles": roles or {}}, "given"
    cfg = run_config(model_dir)
    mappings = {(tuple(s.columns.items()), tuple(s.roles.items())) for s in (cfg.data.train if cfg else [])}
    if len(mappings) == 1:
        cols, rls = next(iter(mappings))
        if cols or rls:
            return {"columns": dict(cols), "roles": dict(rls)}, "the run's training sources"
    return {"columns": {}, "roles": {}}, "none"


@torch.no_grad()
def target_loss(
    model,
    examples,
    pad_id: int,
    batch_size: int,
    objective: Any = None,
    device: Any = None,
    rank: int = 0,
    world: int = 1,
    lockstep: bool = False,
    collate: Any = None,
    max_batches: int | None = None,
) -> tuple[float, int]:
    """(loss sum, normaliser) of the objective (trainer/objective.py; default SFT: summed NLL, target
    tokens) over this rank's share of `examples` in padded batches (eval mode, the model's mode
    restored after). Batch k of `batch_size` goes to rank k % world. `lockstep` (sharded models, whose
    forward is collective): every rank runs the same number of forwards; a rank past the end runs the
    objective's filler batch. `collate`: how a list of examples becomes a batch (default: padded rows;
    packed eval rows pass packed_collate); `max_batches`: only the first that many batches (over all ranks)."""
    objective = objective or SFTObjective()
    collate = collate or (lambda rows: pad_collate(rows, pad_id))
    was_training = model.training
    model.eval()
    total, norm = torch.zeros((), dtype=torch.float64), 0
    count = len(examples) if max_batches is None else min(len(examples), max_batches * batch_size)
    end = math.ceil(count / (batch_size * world)) * batch_size * world if lockstep else count
    for start in range(rank * batch_size, end, batch_size * world):
        batch = collate(examples[start : min(start + batch_size, count)] if start < count else examples[:1])
        if start >= len(examples):
            batch = objective.filler(batch)
        batch = {k: v.to(device) if device is not None else v for k, v in batch.items()}
        total += objective.loss_sum(model, batch).double().cpu()
        norm += objective.normaliser(batch)
    model.train(was_training)
    return total.item(), norm


def evaluate(
    model_dir: str | Path,
    data: str,
    match: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_examples: int | None = None,
    columns: dict[str, str] | None = None,
    roles: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Loss, perplexity (and exact match) of the model in `model_dir` on the file `data`, its fields
    renamed by `columns`/`roles` (default: the run's own mapping, see `column_mapping`)."""
    spec, model_dir = model_dir, Path(model_dir)  # the spec as given: `./run` stays a local path
    mapping, mapping_from = column_mapping(model_dir, columns, roles)
    data_cfg = _data_config(
        model_dir, data, mapping
    )  # a bad mapping or a missing file: before the model loads
    check_local_paths(data_cfg.train)
    model, tokenizer = load_model_dir(spec)
    processor = model_processor(model, model_dir)  # a vision-language model reads its rows with their images
    tokenizer = processor.tokenizer if processor is not None else tokenizer
    examples, _, report = build_datasets(data_cfg, tokenizer, seed=0, template=None, processor=processor)
    if max_examples is not None:
        examples = examples.select(range(min(max_examples, len(examples))))
    collate = (
        functools.partial(vision_collate, processor=processor, pad_id=tokenizer.pad_token_id)
        if processor is not None
        else None
    )
    nll, count = target_loss(model, examples, tokenizer.pad_token_id, batch_size, collate=collate)
    loss = nll / count if count else float("nan")
    result: dict[str, Any] = {
        "model": str(model_dir),
        "data": data,
        "examples": len(examples),
        "target_tokens": count,
        "loss": loss,
        "perplexity": math.exp(loss) if count else float("nan"),
        "rows": report.rows,
        "bad_rows": report.bad,
        "over_length_dropped": report.overlength_dropped,
        "loss_on": data_cfg.loss_on,
        "mapping": {**mapping, "from": mapping_from},
    }
    if match:
        cfg = MatchEvalConfig(
            path=data,
            max_examples=max_examples,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            **mapping,
        )
        result["exact_match"] = _exact_match_record(model, tokenizer, cfg, processor)
    return result


def _exact_match_record(model: Any, tokenizer: Any, cfg: MatchEvalConfig, processor: Any) -> dict[str, Any]:
    """`sftlab eval --match`: greedy replies to the file's prompts scored against its references."""
    pairs = load_match_examples(cfg, images=processor is not None)
    res = exact_match(model, tokenizer, pairs, cfg, None, processor)
    return {
        "correct": res.correct,
        "total": res.total,
        "accuracy": res.accuracy,
        "samples": [list(s) for s in res.samples[:5]],
    }


@torch.no_grad()
def sample_replies(model, examples, tokenizer, count: int, max_new_tokens: int) -> list[dict[str, str]]:
    """Greedy replies to the first `count` eval examples' prompts (their tokens before the first target:
    the chat template's generation prompt included), with the reference the example trains on. Whatever
    the row format: the prompt is cut from the tokenized example, so it is exactly what training sees."""
    samples = []
    was_training = model.training
    model.eval()
    try:
        for i in range(min(count, len(examples))):
            ex = examples[i]
            first = next((t for t, label in enumerate(ex.labels) if label != -100), len(ex.labels))
            if first == 0 or getattr(ex, "images", ()):  # nothing to prompt with, or an image row
                continue
            ids = torch.tensor([ex.input_ids[:first]], device=model.device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            target = [t for t, label in zip(ex.input_ids, ex.labels) if label != -100]
            samples.append(
                {
                    "prompt": tokenizer.decode(ex.input_ids[:first], skip_special_tokens=True)[-300:],
                    "reply": tokenizer.decode(out[0, first:], skip_special_tokens=True),
                    "reference": tokenizer.decode(target, skip_special_tokens=True),
                }
            )
    finally:
        model.train(was_training)
    return samples


@torch.no_grad()
def eval_predictions(
    model, examples, pad_id: int, batch_size: int, accelerator, preprocess=None, collate=None
) -> tuple[Any, Any] | None:
    """(predictions, label_ids) over `examples` as transformers' evaluation loop hands them to
    `compute_metrics`: the logits of every row (or `preprocess(logits, labels)`'s result), rows padded to
    the longest (-100 labels), in the examples' order; on the main process (None elsewhere). Every rank runs
    the same number of forwards (its share, padded with repeats that are dropped), so sharded engines stay
    in step."""
    import numpy as np
    from accelerate.utils import gather_object

    collate = collate or (lambda rows: pad_collate(rows, pad_id))
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = -(-len(examples) // world)
    mine = [min(i, len(examples) - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
    was_training, rows = model.training, []
    model.eval()
    try:
        for start in range(0, len(mine), batch_size):
            index = mine[start : start + batch_size]
            batch = {k: v.to(accelerator.device) for k, v in collate([examples[i] for i in index]).items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            with accelerator.autocast():
                logits = model(**inputs, use_cache=False).logits
            preds = preprocess(logits, batch["labels"]) if preprocess is not None else logits.float()
            for j, i in enumerate(index):
                n = len(examples[i].input_ids)
                rows.append((i, preds[j, :n].detach().cpu().numpy(), batch["labels"][j, :n].cpu().numpy()))
    finally:
        model.train(was_training)
    rows = gather_object(rows) if world > 1 else rows
    if not accelerator.is_main_process:
        return None
    unique = sorted({i: (p, y) for i, p, y in rows}.items())
    longest = max(len(y) for _, (_, y) in unique)

    def padded(a, fill):
        return np.concatenate([a, np.full((longest - len(a), *a.shape[1:]), fill, dtype=a.dtype)])

    predictions = np.stack([padded(p, -100 if p.ndim == 1 else 0) for _, (p, _) in unique])
    return predictions, np.stack([padded(y, -100) for _, (_, y) in unique])


def metrics_of(compute_metrics, predictions, label_ids, prefix: str) -> dict[str, float]:
    """`compute_metrics(EvalPrediction(predictions, label_ids))`'s numbers as `<prefix><name>` (transformers
    prefixes eval_ too); a non-number is left out, a non-mapping result is an error naming the function."""
    from transformers import EvalPrediction

    result = compute_metrics(EvalPrediction(predictions=predictions, label_ids=label_ids))
    if not isinstance(result, dict):
        raise ConfigError(
            f"compute_metrics returned {type(result).__name__}; it must return a dict of metric names to numbers"
        )
    named = {k.removeprefix("eval_"): v for k, v in result.items()}
    return {
        f"{prefix}{k}": float(v)
        for k, v in named.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
