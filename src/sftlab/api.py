"""sftlab as a library: `train`, `prepare`, `evaluate`, `generate` on objects a script already holds.

The argument names are the ones a TRL `SFTTrainer` user knows (docs/python.md has runnable examples):

    import sftlab
    result = sftlab.train(model=model, train_dataset=ds, eval_dataset={"gsm": gsm, "chat": chat},
                          formatting_func=to_messages, callbacks=[EarlyStop()],
                          **{"train.max_steps": 100, "optim.lr": 1e-4})

- `config`: a YAML path, a dict, an `SFTConfig` or None (the library defaults); keyword arguments
  set config keys on it, dotted (`**{"optim.lr": 1e-5}`) or as whole sections (`optim={"lr": 1e-5}`).
- `model`: a name or path (hub id, model directory, `.gguf`, a saved adapter or LoRA run directory:
  that adapter continues), or a model object (a `PreTrainedModel`; a `PeftModel` continues its
  adapter). `tokenizer`: default the model's own. A local path (a `Path`, `./run`, `../x`, `/abs`,
  `~/x`: `sftlab.paths.is_local_path`) that is not there is a ModelLoadError at once, never a Hub lookup.
- `train_dataset` / `eval_dataset`: a `datasets.Dataset` (or `IterableDataset`, or one split of a
  `DatasetDict`), a list of dicts, a pandas DataFrame, a path or a list of paths; `eval_dataset` may
  be a dict name -> any of these, each reported as its own `eval/<name>_loss` (and `eval_loss` over
  all of them). Paths become config sources (recorded in config.yaml); objects are read in chunks
  like files (the bounded-memory preparation, worker processes included, and the cache).
- `formatting_func(row)` -> a list of messages, a {prompt, completion} dict or a text: runs on every
  row inside the preparation and is part of the cache key.
- `callbacks`: trainer/callbacks.py. `objective`: trainer/objective.py (default: SFT).

The CLI (`sftlab train|prepare|generate|chat`) calls these same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from sftlab.config.loading import resolve_config
from sftlab.config.schema import ConfigError, DataConfig, SFTConfig, SourceConfig

DataArg = Any  # Dataset | IterableDataset | list[dict] | DataFrame | str | Path | list of paths


def train(
    config: str | Path | dict | SFTConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: DataArg = None,
    eval_dataset: DataArg | dict[str, DataArg] = None,
    formatting_func: Any = None,
    callbacks: Any = (),
    objective: Any = None,
    console: Console | None = None,
    resume_command: str | None = None,
    **overrides: Any,
):
    """Fine-tune; returns a `TrainResult` (output_dir, steps, final_loss, eval_loss, eval_losses, history,
    stopped). The model, tokenizer, report and metrics are written to `train.output_dir`."""
    from sftlab.trainer.callbacks import check_callbacks
    from sftlab.trainer.loop import run_training

    cfg, inputs = _run_inputs(
        config, overrides, model, tokenizer, train_dataset, eval_dataset, formatting_func
    )
    inputs.callbacks, inputs.objective = check_callbacks(callbacks), objective
    return run_training(cfg, console or Console(soft_wrap=True), resume_command, inputs)


def prepare(
    config: str | Path | dict | SFTConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: DataArg = None,
    eval_dataset: DataArg | dict[str, DataArg] = None,
    formatting_func: Any = None,
    console: Console | None = None,
    **overrides: Any,
):
    """Read, tokenize, mask, cache and pack the data exactly as `train` would; returns the `RunData`
    (tokenizer, template, train/eval examples, named eval sets, the data report)."""
    from sftlab.trainer.data import prepare_run_data

    cfg, inputs = _run_inputs(
        config, overrides, model, tokenizer, train_dataset, eval_dataset, formatting_func
    )
    return prepare_run_data(cfg, console, inputs)


def evaluate(
    model: Any,
    eval_dataset: DataArg | dict[str, DataArg],
    *,
    tokenizer: Any = None,
    config: str | Path | dict | SFTConfig | None = None,
    formatting_func: Any = None,
    batch_size: int = 8,
    objective: Any = None,
    **overrides: Any,
) -> dict[str, float]:
    """The objective's loss of `model` (an object, or anything `sftlab generate` takes: a run, checkpoint
    or model directory, `default`, a hub id) on each eval set: {"eval_loss", "eval_target_tokens"} for
    one set; for a dict also {"eval/<name>_loss", ...} per set. The data go through the training
    pipeline (masks, template, length policy of `config`; for a run directory its own data settings)."""
    from sftlab.data.dataset import build_datasets
    from sftlab.data.templates import load_template
    from sftlab.trainer.evaluate import target_loss
    from sftlab.trainer.objective import SFTObjective

    model, tokenizer, cfg = _model_for_inference(model, tokenizer, config, overrides)
    objective = objective or SFTObjective()
    template = load_template(cfg.data, tokenizer)
    sets = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
    data_cfg = cfg.data.model_copy(update={"train": [], "eval": [], "eval_fraction": 0.0})
    out: dict[str, float] = {}
    totals = [0.0, 0]
    for name, dataset in sets.items():
        examples, _, _ = build_datasets(
            data_cfg,
            tokenizer,
            cfg.train.seed,
            as_sources(dataset, name or None),
            template=template,
            formatting_func=formatting_func,
        )
        total, norm = target_loss(
            model, examples, tokenizer.pad_token_id, batch_size, objective, model.device
        )
        totals = [totals[0] + total, totals[1] + norm]
        if name:
            out.update(objective.record(total, norm, f"eval/{name}_"))
    out.update(objective.record(totals[0], totals[1], "eval_"))
    out["eval_target_tokens"] = totals[1]
    return out


def generate(
    model: Any,
    prompts: str | list,
    *,
    tokenizer: Any = None,
    system: str | None = None,
    tools: list[dict] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
) -> str | list[str]:
    """Replies of `model` (an object, or a run/checkpoint/model directory, `default`, a hub id): to one
    prompt (a str, or one conversation as a list of messages) a str; to a list of those, a list.
    Greedy unless `temperature` > 0. The chat template is the tokenizer's (a run saves its own); `tools`
    (function schemas) must be rendered by it, else a DataError (train with data.chat_template: chatml_tools)."""
    from sftlab.model.generate import generate_replies
    from sftlab.model.sampling import check_sampling

    check_sampling(temperature, top_p, ("temperature", "top_p"))
    model, tokenizer, _ = _model_for_inference(model, tokenizer, None, {})
    single = isinstance(prompts, str) or (
        isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)
    )
    items = [prompts] if single else list(prompts)
    head = [{"role": "system", "content": system}] if system else []
    conversations = [
        head + ([{"role": "user", "content": p}] if isinstance(p, str) else list(p)) for p in items
    ]
    replies = [
        r.strip()
        for r in generate_replies(
            model,
            tokenizer,
            conversations,
            max_new_tokens,
            batch_size,
            temperature=temperature,
            top_p=top_p,
            tools=tools,
        )
    ]
    return replies[0] if single else replies


# --- turning the arguments into a config and the run's inputs -----------------------------------


def _run_inputs(
    config, overrides: dict[str, Any], model, tokenizer, train_dataset, eval_dataset, formatting_func
):
    """(config, RunInputs): paths become config sources, objects travel in RunInputs."""
    from sftlab.trainer.inputs import RunInputs

    values = dict(overrides)
    if isinstance(model, (str, Path)):
        values["model.name_or_path"] = str(model)
    elif model is not None:
        values["model.name_or_path"] = getattr(model, "name_or_path", "") or "<model object>"
    cfg = resolve_config(config, values)
    inputs = RunInputs(
        model=None if isinstance(model, (str, Path)) else model,
        tokenizer=tokenizer,
        formatting_func=formatting_func,
    )
    train_files, inputs.train_sources = _split(as_sources(train_dataset))
    eval_files, inputs.eval_sources = _split(_eval_sources(eval_dataset))
    if train_files or eval_files:
        data = cfg.data.model_copy(
            update={"train": [*cfg.data.train, *train_files], "eval": [*cfg.data.eval, *eval_files]}
        )
        cfg = cfg.model_copy(update={"data": DataConfig.model_validate(data.model_dump())})
    return cfg, inputs


def _split(specs: list) -> tuple[list[SourceConfig], list]:
    return [s for s in specs if isinstance(s, SourceConfig)], [
        s for s in specs if not isinstance(s, SourceConfig)
    ]


def _eval_sources(eval_dataset) -> list:
    if not isinstance(eval_dataset, dict):
        return as_sources(eval_dataset)
    out = []
    for name, dataset in eval_dataset.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(
                f"eval_dataset: the names of eval sets are non-empty strings without '/', got {name!r}"
            )
        out += as_sources(dataset, name)
    return out


def as_sources(dataset: DataArg, name: str | None = None) -> list:
    """A dataset argument as data sources: SourceConfig for paths, DatasetSource for objects."""
    import datasets

    from sftlab.data.sources import DatasetSource

    if dataset is None:
        return []
    if isinstance(dataset, (str, Path)):
        return [SourceConfig(path=str(dataset), name=name)]
    if isinstance(dataset, (SourceConfig, DatasetSource)):
        return [
            dataset.model_copy(update={"name": name})
            if name and isinstance(dataset, SourceConfig)
            else dataset
        ]
    if isinstance(dataset, datasets.DatasetDict):
        raise ConfigError(f"a DatasetDict with splits {list(dataset)}: pass one split, e.g. dataset['train']")
    if isinstance(dataset, list) and dataset and all(isinstance(p, (str, Path)) for p in dataset):
        return [SourceConfig(path=str(p), name=name) for p in dataset]
    return [DatasetSource(_as_dataset(dataset), name=name)]


def _as_dataset(obj: Any):
    """A `datasets.Dataset` from a Dataset, an IterableDataset (written to the datasets cache in
    batches, so memory stays bounded), a list of dicts or a pandas DataFrame."""
    import datasets

    if isinstance(obj, datasets.Dataset):
        return obj
    if isinstance(obj, datasets.IterableDataset):
        return datasets.Dataset.from_generator(_rows_of, gen_kwargs={"iterable": obj}, features=obj.features)
    if isinstance(obj, list):
        if not all(isinstance(r, dict) for r in obj):
            raise ConfigError("a dataset given as a list must hold one dict per row")
        return datasets.Dataset.from_list(obj)
    if type(obj).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(obj, preserve_index=False)
    raise ConfigError(
        f"a dataset must be a datasets.Dataset/IterableDataset, a list of dicts, a pandas DataFrame "
        f"or a path; got {type(obj).__name__}"
    )


def _rows_of(iterable):
    yield from iterable


def _model_for_inference(model: Any, tokenizer: Any, config, overrides: dict[str, Any]):
    """(model, tokenizer, config) for evaluate/generate: a model object as it is (its own tokenizer by
    default); a path or name loaded as `sftlab generate` loads it, with a run's own config."""
    from sftlab.trainer.inference import load_model_dir, run_config

    if isinstance(model, (str, Path)):
        model_obj, own_tokenizer = load_model_dir(model)
        cfg = resolve_config(config if config is not None else run_config(model), overrides)
        return model_obj, tokenizer or own_tokenizer, cfg
    from sftlab.model.loading import load_tokenizer, with_pad_token

    cfg = resolve_config(config, overrides)
    if tokenizer is not None:
        return model, with_pad_token(tokenizer), cfg
    path = getattr(model, "name_or_path", "")
    if not path:
        raise ConfigError("the model object has no name_or_path to load its tokenizer from: pass tokenizer=")
    return model, load_tokenizer(cfg.model, path), cfg
