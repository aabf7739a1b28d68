"""TRL's `SFTTrainer` call as `sftlab.train` / `sftlab.prepare` take it: each TRL argument is accepted,
translated into sftlab's config (what was mapped and what has no counterpart is printed), or refused
before any work, naming the sftlab way in Python form (docs/migrating.md, "From a TRL script"). TRL is
never imported: its objects are recognised by their class names and fields.

- the first positional argument: a config (a `.yaml`/`.yml`/`.json` file, a dict, sftlab's `SFTConfig`),
  a model (a directory, a `.gguf` file, a hub id, a model object) or TRL's `args`;
- `args`: a TRL `SFTConfig` or transformers `TrainingArguments`: the fields set otherwise than the
  class's defaults go through `sftlab convert-config --from trl`'s converter (`migrate.convert_tree`);
- `peft_config`: a peft `LoraConfig` becomes the `peft` section (`peft_section`);
- `processing_class`: the tokenizer (a processor: its tokenizer);
- keyword arguments that are not config keys (TRL's `data_collator`, `optimizers`,
  ..., or a mistyped key) are reported together, each with its fix (`triage_keywords`);
- `formatting_func`: TRL's batched form (a dict of lists -> a list of texts) is detected on the first
  row it formats (`TRLFormatting`);
- a data error about dataset objects names `sftlab.DatasetSource(ds, columns=...)` where it would name
  a YAML source's `columns:` (`python_fixes`).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.config.keys import suggest_key
from sftlab.config.schema import ConfigError, SFTConfig
from sftlab.migrate import NOT_NEEDED, convert_tree
from sftlab.migrate.values import short

KEYWORDS_HINT = "keyword arguments are config keys: dotted, e.g. **{'optim.lr': 1e-5}, or sections"
PEFT_FIELDS = {  # peft's LoraConfig field -> sftlab's peft key
    "r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "target_modules",
    "use_rslora": "use_rslora",
    "use_dora": "method",
    "bias": "bias",
    "modules_to_save": "modules_to_save",
}
PEFT_IGNORED = {  # LoraConfig fields that say nothing about the adapter trained
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "fan_in_fan_out",
}
ARGS_IGNORED = {"logging_dir"}  # TrainingArguments fields that differ per instance
PADDING_COLLATORS = {  # the collators that only pad (and copy input_ids to labels): what sftlab does
    "DataCollatorWithPadding",
    "DataCollatorForSeq2Seq",
    "DefaultDataCollator",
    "DataCollatorForLanguageModeling",
}


@dataclass
class Translated:
    """A TRL-style call, translated: what `sftlab.train` goes on with."""

    config: Any  # for resolve_config: a path, a dict, an SFTConfig or None
    model: Any
    tokenizer: Any
    values: dict[str, Any]  # config keys set by keyword
    args: Any = None  # TRL's args object (the TrainerCallbacks see it)
    text_field: str | None = None  # args.dataset_text_field, when not "text"
    notes: list[str] = field(default_factory=list)


def translate(
    config: Any,
    model: Any,
    tokenizer: Any,
    overrides: dict[str, Any],
    args: Any = None,
    peft_config: Any = None,
    processing_class: Any = None,
) -> Translated:
    """The call's arguments in sftlab's terms; every problem found is reported at once (a ConfigError)."""
    problems: list[str] = []
    config, model, args = _first_argument(config, model, args, problems)
    values, notes = triage_keywords(overrides, problems)
    if processing_class is not None:
        if tokenizer is not None:
            problems.append("tokenizer= and processing_class= are both given: pass one")
        tokenizer = getattr(processing_class, "tokenizer", None) if _is_processor(processing_class) else None
        tokenizer = tokenizer or processing_class
    if peft_config is not None:
        problems += peft_problems(peft_config, model)
    if args is not None and not (isinstance(args, dict) or is_training_args(args)):
        problems.append(
            f"args={type(args).__name__}: expected a TRL SFTConfig or transformers TrainingArguments "
            "(or a dict of their fields)"
        )
    elif args is not None and config is not None:
        problems.append(
            f"config={_name(config)} and args={type(args).__name__} are both given: pass one "
            "(args is converted to an sftlab config)"
        )
    if problems:
        raise ConfigError(_problems_message(problems))
    out = Translated(config, model, tokenizer, values, args, notes=notes)
    if args is not None:
        out.config, out.text_field, lines = convert_args(args)
        out.notes = lines + out.notes
    return out


def _name(x: Any) -> str:
    return repr(str(x)) if isinstance(x, (str, Path)) else type(x).__name__


def _problems_message(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} arguments cannot be used as given:\n" + "\n".join(f"  - {p}" for p in problems)


# --- the first positional argument ---------------------------------------------------------------


def is_training_args(obj: Any) -> bool:
    """A TRL `SFTConfig` or transformers `TrainingArguments` (or a subclass, or a stand-in): recognised by
    its class name and fields, without importing TRL."""
    return (
        not isinstance(obj, (dict, str, Path, SFTConfig))
        and type(obj).__name__.endswith(("Config", "Arguments"))
        and all(hasattr(obj, a) for a in ("output_dir", "learning_rate", "per_device_train_batch_size"))
    )


def is_model_spec(first: Any) -> bool:
    """A path or name passed first that is a model, not a config file: a directory, a `.gguf` file, or a
    string that is neither an existing file nor a `.yaml`/`.yml`/`.json` name (a hub id, a missing path)."""
    if not isinstance(first, (str, Path)):
        return False
    path = Path(first).expanduser()
    if path.is_dir() or path.suffix == ".gguf":
        return True
    return not path.is_file() and path.suffix.lower() not in (".yaml", ".yml", ".json")


def _is_model_object(obj: Any) -> bool:
    return callable(getattr(obj, "forward", None)) and hasattr(obj, "config")


def _first_argument(first: Any, model: Any, args: Any, problems: list[str]) -> tuple[Any, Any, Any]:
    """(config, model, args): TRL's first positional argument is the model, or its args."""
    if first is None or isinstance(first, (dict, SFTConfig)):
        return first, model, args
    if is_training_args(first):
        if args is not None:
            problems.append(
                f"the first argument is training arguments ({type(first).__name__}) and args= too"
            )
        return None, model, first
    if is_model_spec(first) or _is_model_object(first):
        if model is not None:
            problems.append(f"the first argument {_name(first)} is a model and model= is given too: pass one")
        return None, first, args
    return first, model, args


def _is_processor(obj: Any) -> bool:
    return hasattr(obj, "tokenizer") and not hasattr(obj, "convert_tokens_to_ids")


# --- keyword arguments -------------------------------------------------------------------------------


def triage_keywords(overrides: dict[str, Any], problems: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(the config keys, notes): a keyword that is a config key is kept; TRL's trainer arguments are
    translated or refused; a TRL option sftlab needs no counterpart for is dropped with a note; anything
    else is an unknown key with its did-you-mean in Python form. Problems go to `problems`."""
    values: dict[str, Any] = {}
    notes: list[str] = []
    for key, value in overrides.items():
        if "." in key or key in SFTConfig.model_fields:
            values[key] = value
        elif key == "data_collator":
            _collator(value, values, notes, problems)
        elif key in REFUSED:
            problems.append(REFUSED[key](value))
        elif key in NOT_NEEDED:
            notes.append(f"{key}={short(_plain(value))}: not needed ({NOT_NEEDED[key]}); ignored")
        else:
            problems.append(unknown_keyword(key, value))
    if len(problems) == 1 and "unknown key" in problems[0]:
        problems[0] += f" ({KEYWORDS_HINT})"
    return values, notes


def unknown_keyword(key: str, value: Any) -> str:
    """`learning_rate: unknown key; did you mean optim.lr? (**{'optim.lr': 0.0001})`; a key of a data
    source is named as `sftlab.DatasetSource`'s argument."""
    hint = suggest_key((key,))
    if hint is None:
        return f"{key}: unknown key"
    if key == "dataset_text_field":
        fix = f"train_dataset=sftlab.DatasetSource(ds, columns={{'text': {value!r}}})"
    elif ".N." in hint:
        fix = f"train_dataset=sftlab.DatasetSource(ds, {hint.split('.N.')[1]}=...)"
    elif "." not in hint:
        fix = f"{hint}={{...}}"
    else:
        fix = f"**{{{hint!r}: {_plain(value)!r}}}"
    return f"{key}: unknown key; did you mean {hint}? ({fix})"


def _collator(collator: Any, values: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    """TRL's completion-only collator is `data.response_template`; a padding collator is what sftlab does."""
    name = type(collator).__name__
    marker = getattr(collator, "response_template", None)
    if isinstance(marker, str):
        values["data.response_template"] = marker
        lines = [f"data_collator={name}: response_template={marker!r} -> data.response_template"]
        if isinstance(getattr(collator, "instruction_template", None), str):
            values["data.instruction_template"] = collator.instruction_template
            lines.append("instruction_template -> data.instruction_template")
        notes.append("; ".join(lines))
    elif marker is not None:
        problems.append(
            f"data_collator={name}: its response_template is token ids; give the text: "
            "**{'data.response_template': ' ### Answer:'}"
        )
    elif name in PADDING_COLLATORS and not getattr(collator, "mlm", False):
        notes.append(f"data_collator={name}: not needed (sftlab pads each micro-batch itself); ignored")
    else:
        problems.append(
            f"data_collator={name}: not supported: sftlab lays out each micro-batch itself (padding, "
            "data.packing, a vision model's processor); turn rows into messages, prompt/completion or text "
            "with formatting_func=, and choose the trained tokens with **{'data.loss_on': 'assistant'} "
            "or **{'data.response_template': ...}"
        )


def _optimizers(value: Any) -> str:
    opt = value[0] if isinstance(value, (tuple, list)) and value else value
    group = (getattr(opt, "param_groups", None) or [{}])[0]
    optim: dict[str, Any] = {"name": _OPTIMIZERS.get(type(opt).__name__, "adamw")}
    optim.update({k: group[k] for k in ("lr", "weight_decay", "eps") if k in group})
    if "betas" in group:
        optim["betas"] = list(group["betas"])
    return (
        f"optimizers: not supported: sftlab builds the optimizer and schedule from the config: "
        f"optim={optim!r} (optim.name: adamw, adamw_8bit, paged_adamw_8bit, adafactor, sgd; "
        "optim.scheduler: linear, cosine, constant; optim.warmup_steps)"
    )


def _optimizer_cls(value: Any) -> str:
    cls, kwargs = value if isinstance(value, (tuple, list)) and len(value) == 2 else (value, {})
    optim = {"name": _OPTIMIZERS.get(getattr(cls, "__name__", ""), "adamw"), **dict(kwargs or {})}
    return f"optimizer_cls_and_kwargs: not supported: set the optimizer in the config: optim={optim!r}"


_OPTIMIZERS = {"AdamW": "adamw", "Adam": "adamw", "SGD": "sgd", "Adafactor": "adafactor"}
REFUSED = {  # SFTTrainer arguments sftlab does not take -> the message naming the sftlab way
    "optimizers": _optimizers,
    "optimizer_cls_and_kwargs": _optimizer_cls,
    "model_init": lambda v: (
        "model_init: not supported (sftlab trains the one model it is given, no hyperparameter search): "
        "model=model_init()"
    ),
    "compute_loss_func": lambda v: (
        "compute_loss_func: the loss of a batch is the objective's: objective=YourObjective() "
        "(docs/architecture.md, 'The objective seam')"
    ),
}


# --- TRL's args ------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A field value as the converter reads a YAML value: enums as their values, sets as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset, tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value if value is None or isinstance(value, (str, int, float, bool)) else str(value)


def _fields(obj: Any) -> dict[str, Any]:
    names = (
        [f.name for f in dataclasses.fields(obj)]
        if dataclasses.is_dataclass(obj)
        else [k for k in vars(obj) if not k.startswith("_")]
    )
    return {n: _plain(getattr(obj, n, None)) for n in names}


def set_fields(args: Any) -> dict[str, Any]:
    """The fields of `args` set otherwise than a fresh instance of its class has them (what a script
    wrote), and always `learning_rate` (TrainingArguments' 5e-5 is not TRL's 2e-5); tokens redacted."""
    values = _fields(args)
    try:
        fresh = _fields(type(args)())
    except Exception:  # noqa: BLE001 - a class that needs arguments: its fields' defaults
        fresh = {
            f.name: _plain(f.default)
            for f in (dataclasses.fields(args) if dataclasses.is_dataclass(args) else ())
            if f.default is not dataclasses.MISSING
        }
    out = {
        k: v
        for k, v in values.items()
        if k not in ARGS_IGNORED and (k == "learning_rate" or k not in fresh or fresh[k] != v)
    }
    return {k: "<redacted>" if k.endswith("token") and v is not None else v for k, v in out.items()}


def convert_args(args: Any) -> tuple[dict[str, Any], str | None, list[str]]:
    """(the sftlab config tree, dataset_text_field when not "text", the lines printed): `args` (an object,
    or a dict of its fields) converted as `sftlab convert-config --from trl` converts a file holding the
    fields the script set."""
    raw = {str(k): _plain(v) for k, v in args.items()} if isinstance(args, dict) else set_fields(args)
    c = convert_tree(raw, "trl", Path.cwd(), placeholder=False)
    lines = [f"args={type(args).__name__}: converted as `sftlab convert-config --from trl` converts a file"]
    for key, value in raw.items():
        if c.mapped.get(key):
            lines.append(f"  {key}={short(value)} -> {', '.join(c.mapped[key])}")
    field_name = raw.get("dataset_text_field")
    if field_name not in (None, "text"):
        lines.append(
            f"  dataset_text_field={field_name!r} -> sftlab.DatasetSource(ds, columns={{'text': {field_name!r}}}) "
            "for each dataset (without a formatting_func)"
        )
    lines += [f"  {line}" for line in c.notes + c.skipped]
    return c.tree, field_name if field_name not in (None, "text") else None, lines


# --- peft's LoraConfig -------------------------------------------------------------------------------


def peft_problems(peft_config: Any, model: Any) -> list[str]:
    """What of a peft config sftlab's `peft` section cannot hold, each with the fix."""
    kind = str(_plain(getattr(peft_config, "peft_type", "")))
    if kind != "LORA":
        return [
            f"peft_config={type(peft_config).__name__}: sftlab trains LoRA/DoRA adapters (peft.LoraConfig); "
            "for another peft method pass the wrapped model: model=peft.get_peft_model(model, peft_config)"
        ]
    if model is not None and hasattr(model, "peft_config"):
        return ["peft_config= with a PeftModel as model: its own adapter continues; drop peft_config"]
    try:
        fresh = _fields(type(peft_config)())
    except Exception:  # noqa: BLE001 - compared field by field below only when it builds
        fresh = {}
    task = _plain(getattr(peft_config, "task_type", None))
    out = []
    if task not in (None, "CAUSAL_LM"):
        out.append(f"peft_config.task_type={task!r}: sftlab trains causal LMs (task_type='CAUSAL_LM')")
    for name, value in _fields(peft_config).items():
        if name in PEFT_FIELDS or name in PEFT_IGNORED or name not in fresh or fresh[name] == value:
            continue
        out.append(
            f"peft_config.{name}={short(value)}: not in sftlab's peft section (r, alpha, dropout, target_modules, "
            "use_rslora, bias, modules_to_save, method); to train with it, pass the wrapped model: "
            "model=peft.get_peft_model(model, peft_config)"
        )
    return out


def peft_section(peft_config: Any, model_type: str | None) -> tuple[dict[str, Any], list[str]]:
    """(the `peft` section, the line printed) of a LoraConfig; target_modules=None (peft's defaults for
    the model type) is looked up for `model_type`."""
    targets = _plain(peft_config.target_modules)
    if targets is None:
        targets = _default_targets(model_type)
    section = {
        "method": "dora" if peft_config.use_dora else "lora",
        "r": peft_config.r,
        "alpha": float(peft_config.lora_alpha),
        "dropout": peft_config.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
        "use_rslora": bool(peft_config.use_rslora),
        "bias": str(_plain(peft_config.bias) or "none"),
        "modules_to_save": sorted(_plain(peft_config.modules_to_save))
        if peft_config.modules_to_save
        else None,
    }
    mapped = ", ".join(
        f"{k}={short(_plain(getattr(peft_config, k)))} -> peft.{v}" for k, v in PEFT_FIELDS.items()
    )
    if peft_config.target_modules is None:
        mapped += f" (peft's default for {model_type}: {section['target_modules']})"
    return section, [f"peft_config={type(peft_config).__name__}: {mapped}"]


def _default_targets(model_type: str | None) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type not in DEFAULTS:
        raise ConfigError(
            "peft_config.target_modules=None: peft picks the model type's defaults"
            + (f", and has none for {model_type!r}" if model_type else ", unknown before the model loads")
            + ": name them, e.g. LoraConfig(target_modules=['q_proj', 'v_proj']) or target_modules='all-linear'"
        )
    return list(DEFAULTS[model_type])


def model_type(model: Any, name_or_path: str) -> str | None:
    """The model's `model_type`: of the object, else of a local directory's config.json (the default
    model's too); None for a hub id."""
    if model is not None and not isinstance(model, (str, Path)):
        return getattr(getattr(model, "config", None), "model_type", None)
    name = str(model or name_or_path)
    if name == "default":
        from sftlab.model.loading import default_model_dir

        name = default_model_dir()
    config = Path(name).expanduser() / "config.json"
    if config.is_file():
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    return None


# --- formatting_func -------------------------------------------------------------------------------


class TRLFormatting:
    """A formatting_func as TRL takes it: one row -> one example, or TRL's batched form (a dict of lists
    -> a list of texts), detected on the first row it formats: a function that fails on a row, or returns
    a list of texts for it, and returns a list of one example for the row as a batch of one, is batched
    from then on. Pickled (the worker processes, the cache key) as the function alone."""

    def __init__(self, func: Any):
        self.func = func
        self.batched: bool | None = None
        self.__qualname__ = getattr(func, "__qualname__", type(func).__name__)

    def __getstate__(self) -> dict[str, Any]:
        return {"func": self.func}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["func"])

    def __call__(self, row: dict[str, Any]) -> Any:
        if self.batched is True:
            return self._one_of_batch(row)
        if self.batched is False:
            return self.func(row)
        try:
            out, error = self.func(row), None
        except Exception as e:  # noqa: BLE001 - perhaps the batched form; re-raised below if not
            out, error = None, e
        if error is None and not (isinstance(out, list) and all(isinstance(x, str) for x in out)):
            self.batched = False
            return out
        try:
            one = self.func({k: [v] for k, v in row.items()})
        except Exception:  # noqa: BLE001 - not the batched form either: the row's own outcome stands
            one = None
        if isinstance(one, list) and len(one) == 1:
            self.batched = True
            return one[0]
        if error is not None:
            raise error
        return out

    def _one_of_batch(self, row: dict[str, Any]) -> Any:
        out = self.func({k: [v] for k, v in row.items()})
        if not (isinstance(out, list) and len(out) == 1):
            raise TypeError(
                f"the batched formatting_func returned {type(out).__name__} for a batch of one row; "
                "expected a list of one text"
            )
        return out[0]


# --- data errors in Python form ---------------------------------------------------------------------

_MAPPING = re.compile(r"\b(columns|roles): \{([^{}]*)\}")


def _python_form(m: re.Match) -> str:
    pairs = [p.split(":", 1) for p in m.group(2).split(",") if ":" in p]
    mapping = {k.strip(): v.strip() for k, v in pairs}
    return f"sftlab.DatasetSource(ds, {m.group(1)}={mapping!r})"


def python_fixes(message: str, file_names: list[str]) -> str:
    """`message` with each YAML `columns: {a: b}` / `roles: {x: y}` fix written as
    `sftlab.DatasetSource(ds, columns={'a': 'b'})`, on the lines that name none of the run's files."""
    return "\n".join(
        line if any(name in line for name in file_names) else _MAPPING.sub(_python_form, line)
        for line in message.split("\n")
    )
