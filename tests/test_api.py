"""The Python API (sftlab/api.py) as a TRL user would call it: model objects, Datasets, a formatting
function, several eval sets, callbacks, continuing an adapter; each checked against the YAML/CLI path."""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import sftlab
from sftlab.cli import main as cli_main
from sftlab.config import ConfigError, SFTConfig
from sftlab.trainer.callbacks import CallbackError
from sftlab.trainer.checkpoint import COMPLETE, latest_checkpoint
from sftlab.trainer.loop import run_training
from sftlab.trainer.rundir import FINISHED

QUESTIONS = [
    "What is one plus two?",
    "Numbers: one two",
    "What is the capital of France?",
    "Tell me a joke.",
    "Convert March 5, 2021",
    "Hello!",
    "the quick brown fox",
    "Thanks",
]
ANSWERS = [
    "three",
    "three four five",
    "Paris.",
    "Why did the chicken cross the road?",
    "2021-03-05",
    "Hello! How can I help you today?",
    "jumps over the lazy dog",
    "Sure, that's great!",
]
GSM_ROWS = [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS)]


def settings(model_dir, out, **train) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "data": {"max_seq_length": 256},
        "optim": {"lr": 3e-3, "warmup_steps": 0},
        "train": {
            "output_dir": str(out),
            "micro_batch_size": 2,
            "grad_accum_steps": 2,
            "max_steps": 3,
            "mixed_precision": "no",
            **train,
        },
    }


def losses(result) -> list[float]:
    return [r["loss"] for r in result.history]


def to_prompt_completion(row: dict) -> dict:
    return {"prompt": row["question"], "completion": row["answer"]}


def test_trl_style_script_equals_the_yaml_run_with_a_column_mapping(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "gsm.jsonl", GSM_ROWS)
    tree = settings(tiny_model_dir, tmp_path / "yaml")
    tree["data"]["train"] = [{"path": str(data), "columns": {"prompt": "question", "completion": "answer"}}]
    yaml_run = run_training(SFTConfig.model_validate(tree))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    script = sftlab.train(
        settings(tiny_model_dir, tmp_path / "api"),
        model=model,
        train_dataset=datasets.Dataset.from_list(GSM_ROWS),
        formatting_func=to_prompt_completion,
    )
    assert losses(script) == losses(yaml_run)
    assert [r["grad_norm"] for r in script.history] == [r["grad_norm"] for r in yaml_run.history]
    info = json.loads((tmp_path / "api" / "run.json").read_text())["inputs"]
    assert info["model_object"] == "LlamaForCausalLM" and info["formatting_func"] == "to_prompt_completion"
    assert info["train_datasets"][0]["rows"] == len(GSM_ROWS)


def test_datasets_as_lists_dataframes_and_iterables_read_like_the_file(tiny_model_dir, tmp_path):
    import pandas as pd

    base = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"), train_dataset=GSM_ROWS, formatting_func=to_prompt_completion
    )
    iterable = datasets.IterableDataset.from_generator(lambda: iter(GSM_ROWS))
    for given in (pd.DataFrame(GSM_ROWS), iterable):
        other = sftlab.prepare(
            settings(tiny_model_dir, tmp_path / "x"),
            train_dataset=given,
            formatting_func=to_prompt_completion,
        )
        assert [list(e.input_ids) for e in other.train] == [list(e.input_ids) for e in base.train]
        assert [list(e.labels) for e in other.train] == [list(e.labels) for e in base.train]


def test_the_formatting_function_is_part_of_the_cache_key(tiny_model_dir, tmp_path):
    ds = datasets.Dataset.from_list(GSM_ROWS)
    first = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"), train_dataset=ds, formatting_func=to_prompt_completion
    )
    upper = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"),
        train_dataset=ds,
        formatting_func=lambda r: {"prompt": r["question"].upper(), "completion": r["answer"]},
    )
    assert [list(e.input_ids) for e in first.train] != [list(e.input_ids) for e in upper.train]
    again = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"), train_dataset=ds, formatting_func=to_prompt_completion
    )
    assert all(s.cached for s in again.report.sources)
    assert [list(e.input_ids) for e in again.train] == [list(e.input_ids) for e in first.train]


def test_trl_completion_only_text_trains_only_the_answers(tiny_model_dir, tmp_path):
    to_text = lambda r: f"### Question: {r['question']}\n ### Answer: {r['answer']}"
    data = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"),
        train_dataset=GSM_ROWS,
        formatting_func=to_text,
        **{"data.response_template": " ### Answer:"},
    )
    trained = sorted(
        data.tokenizer.decode([t for t, lab in zip(e.input_ids, e.labels) if lab != -100]) for e in data.train
    )
    assert trained == sorted(f" {a}{data.tokenizer.eos_token}" for a in ANSWERS)
    with pytest.raises(
        ConfigError, match=r"response_template: unknown key; did you mean data.response_template\?"
    ):
        sftlab.prepare(train_dataset=GSM_ROWS, formatting_func=to_text, response_template=" ### Answer:")


def test_a_failing_formatting_function_names_itself_per_row(tiny_model_dir, tmp_path):
    def picky(row):
        if row["question"] == "Hello!":
            raise KeyError("no greeting")
        return to_prompt_completion(row)

    data = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"), train_dataset=GSM_ROWS, formatting_func=picky
    )
    assert data.report.bad == 1 and "formatting_func" in data.report.bad_examples[0]
    assert "KeyError" in data.report.bad_examples[0] and len(data.train) == len(GSM_ROWS) - 1


def test_a_function_workers_cannot_receive_is_refused_naming_num_proc():
    from sftlab.data.dataset import check_sendable
    from sftlab.data.tokenize import ChunkContext
    from sftlab.data.types import DataError

    ctx = ChunkContext(None, "src", [], "auto", "assistant", None, "uint16", formatting_func=lambda r: r)
    with pytest.raises(DataError, match=r"data.num_proc=2 .*module level.*data.num_proc=1"):
        check_sendable(ctx, 2, "spawn")
    check_sendable(ctx, 2, "fork")  # forked workers inherit it
    ctx.formatting_func = to_prompt_completion
    check_sendable(ctx, 2, "spawn")  # a module-level function pickles


def test_formatting_in_worker_processes_equals_one_process(tiny_model_dir, tmp_path):
    rows = GSM_ROWS * 40
    one = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"),
        train_dataset=rows,
        formatting_func=to_prompt_completion,
        **{"data.cache": False},
    )
    two = sftlab.prepare(
        settings(tiny_model_dir, tmp_path / "x"),
        train_dataset=rows,
        formatting_func=to_prompt_completion,
        **{"data.cache": False, "data.num_proc": 2},
    )
    assert [list(e.input_ids) for e in one.train] == [list(e.input_ids) for e in two.train]


def test_two_eval_sets_give_two_losses_each_equal_to_sftlab_eval(tiny_model_dir, tmp_path, capsys):
    a, b = GSM_ROWS[:3], GSM_ROWS[3:]
    files = {
        "a": write_jsonl(tmp_path / "a.jsonl", [to_prompt_completion(r) for r in a]),
        "b": write_jsonl(tmp_path / "b.jsonl", [to_prompt_completion(r) for r in b]),
    }
    out = tmp_path / "run"
    res = sftlab.train(
        settings(tiny_model_dir, out),
        train_dataset=GSM_ROWS,
        formatting_func=to_prompt_completion,
        eval_dataset={"a": a, "b": b},
    )
    last = res.history[-1]
    assert {"eval_loss", "eval/a_loss", "eval/b_loss"} <= last.keys()
    assert res.eval_losses == {"eval/a_loss": last["eval/a_loss"], "eval/b_loss": last["eval/b_loss"]}
    assert last["eval/a_loss"] != last["eval/b_loss"]
    for name, path in files.items():
        capsys.readouterr()
        assert cli_main(["eval", str(out), "--data", str(path), "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert cli["loss"] == pytest.approx(last[f"eval/{name}_loss"], rel=1e-5)
    # and the API's evaluate on the saved run gives the same numbers
    again = sftlab.evaluate(out, {"a": a, "b": b}, formatting_func=to_prompt_completion)
    assert again["eval/a_loss"] == pytest.approx(last["eval/a_loss"], rel=1e-5)
    assert again["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-5)
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval/a_loss" in logged[-1]


def test_a_named_eval_set_of_bad_rows_fails_before_training(tiny_model_dir, tmp_path):
    """Its loss would be nan, every evaluation; the bad rows of all sources together are few."""
    from sftlab.data.types import DataError

    out = tmp_path / "run"
    train_rows = [to_prompt_completion(r) for r in GSM_ROWS] * 2
    no_answer = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS[:2]]
    with pytest.raises(DataError) as e:
        sftlab.train(
            settings(tiny_model_dir, out),
            train_dataset=train_rows,
            eval_dataset={"gsm": train_rows[:3], "chat": no_answer},
        )
    assert str(e.value).startswith("eval set 'chat': 2 of 2 rows are bad (> data.max_bad_fraction=0.5")
    assert "chat row 1 field 'messages': no assistant turn" in str(e.value)
    assert not (out / "metrics.jsonl").exists()


class Recorder:
    def __init__(self, stop_at: int | None = None):
        self.records, self.saves, self.evals, self.stop_at = [], [], [], stop_at
        self.began = self.ended = None

    def on_train_begin(self, info):
        self.began = info

    def on_step_end(self, record):
        self.records.append(dict(record))
        return self.stop_at is not None and record["step"] == self.stop_at

    def on_evaluate(self, metrics):
        self.evals.append(metrics)

    def on_save(self, path):
        assert (path / COMPLETE).is_file()  # only complete checkpoints are announced
        self.saves.append(path.name)

    def on_train_end(self, result):
        self.ended = result


def test_callbacks_see_every_step_and_a_stop_request_resumes_exactly(tiny_model_dir, chat_file, tmp_path):
    tree = settings(tiny_model_dir, tmp_path / "full", max_steps=5, eval_every=2)
    tree["data"]["train"], tree["data"]["eval_fraction"] = str(chat_file), 0.2
    full = Recorder()
    reference = sftlab.train(tree, callbacks=[full])
    assert [r["step"] for r in full.records] == [1, 2, 3, 4, 5]
    assert full.records == reference.history and full.ended is reference
    assert full.began["total_steps"] == 5 and [m["step"] for m in full.evals] == [2, 4, 5]

    stopper = Recorder(stop_at=3)
    out = tmp_path / "stopped"
    stopped = sftlab.train(tree, callbacks=[stopper], **{"train.output_dir": str(out)})
    assert stopped.stopped.startswith("Recorder.on_step_end at step 3")
    assert stopper.saves == ["step-00000003"] and latest_checkpoint(out).name == "step-00000003"
    assert not (out / FINISHED).exists() and not (out / "model.safetensors").exists()
    resumed = sftlab.train(tree, **{"train.output_dir": str(out), "train.resume": "auto"})
    assert losses(resumed) == losses(reference)
    assert [r["grad_norm"] for r in resumed.history] == [r["grad_norm"] for r in reference.history]


def test_a_raising_callback_names_itself_and_leaves_the_checkpoint_whole(tiny_model_dir, chat_file, tmp_path):
    class Broken:
        def on_step_end(self, record):
            if record["step"] == 2:
                raise ValueError("boom")

    out = tmp_path / "run"
    tree = settings(tiny_model_dir, out, max_steps=4)
    tree["data"]["train"] = str(chat_file)
    tree["checkpoint"] = {"every_steps": 1}
    with pytest.raises(
        CallbackError, match=r"callback Broken.on_step_end raised at step 2: ValueError: boom"
    ):
        sftlab.train(tree, callbacks=[Broken()])
    last = latest_checkpoint(out)
    assert last.name == "step-00000002" and (last / COMPLETE).is_file()
    assert not list((out / "checkpoints").glob(".tmp-*"))
    resumed = sftlab.train(tree, **{"train.resume": "auto"})
    assert resumed.steps == 4 and (out / FINISHED).is_file()


def test_callbacks_are_checked_before_training():
    class NoHooks:
        def on_stepend(self, record):
            pass

    with pytest.raises(TypeError, match="NoHooks has none of the hooks"):
        sftlab.train(callbacks=[NoHooks()], train_dataset=GSM_ROWS)
    with pytest.raises(TypeError, match=r"pass an instance \(Recorder\(\)\)"):
        sftlab.train(callbacks=[Recorder], train_dataset=GSM_ROWS)


def test_keyword_arguments_are_config_keys_with_suggestions(tmp_path):
    with pytest.raises(ConfigError, match=r"learning_rate: unknown key; did you mean optim.lr\?"):
        sftlab.train(train_dataset=GSM_ROWS, learning_rate=1e-4)
    with pytest.raises(ConfigError, match=r"optim.lrr: unknown key; did you mean optim.lr\?"):
        sftlab.prepare(train_dataset=GSM_ROWS, optim={"lrr": 1e-4})


def test_an_adapter_is_continued_by_a_second_run(tiny_model_dir, chat_file, tmp_path):
    peft = {"r": 4, "alpha": 8, "dropout": 0.0}
    first_out, second_out = tmp_path / "first", tmp_path / "second"
    tree = settings(tiny_model_dir, first_out, max_steps=3)
    tree["data"]["train"], tree["peft"] = str(chat_file), peft
    first = sftlab.train(tree)
    second = sftlab.train(settings(first_out, second_out, max_steps=3), train_dataset=str(chat_file))
    saved1, saved2 = (load_file(str(d / "adapter_model.safetensors")) for d in (first_out, second_out))
    assert saved1.keys() == saved2.keys()
    assert any(not torch.equal(saved1[k], saved2[k]) for k in saved1)  # it trained further
    assert (
        second.history[0]["loss"] < first.history[0]["loss"]
    )  # from the first run's adapter, not from scratch
    base = json.loads((second_out / "sftlab_base.json").read_text())
    assert base["name_or_path"] == str(tiny_model_dir)  # the true base, not the first run's directory
    assert isinstance(sftlab.generate(second_out, "Hello!", max_new_tokens=3), str)


def test_a_peft_model_object_continues_its_adapter(tiny_model_dir, chat_file, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    )
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    out = tmp_path / "run"
    sftlab.train(settings(tiny_model_dir, out, max_steps=2), model=model, train_dataset=str(chat_file))
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert len(saved) == len(names) and all("lora_" in k for k in saved)
    cfg = SFTConfig.model_validate(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert cfg.peft.r == 4 and cfg.peft.target_modules == ["q_proj", "v_proj"]


def test_import_sftlab_is_light():
    code = "import sys, sftlab; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(sftlab.train) and sftlab.SFTConfig is SFTConfig


def test_sftlab_train_is_the_documented_function_even_after_the_trainer_is_imported():
    """`sftlab.train` is a plain function (not a package made callable): importing the training modules does
    not rebind it, and help() / inspect.signature() show the API's signature."""
    import inspect

    import sftlab.trainer.loop  # noqa: F401  (binds sftlab.trainer, never sftlab.train)
    from sftlab import api

    assert sftlab.train is api.train and inspect.isfunction(sftlab.train)
    params = inspect.signature(sftlab.train).parameters
    assert {"model", "train_dataset", "eval_dataset", "callbacks"} <= set(params)


def test_a_local_looking_model_path_never_reaches_the_hub(chat_file, tmp_path, monkeypatch, no_hub):
    """sftlab.generate/evaluate with `./run` (or a Path) that is not there: one error naming it, no Hub call."""
    from pathlib import Path

    from sftlab.model.loading import ModelLoadError

    monkeypatch.chdir(tmp_path)
    for call in (
        lambda: sftlab.generate("./missing-run", "Hi"),
        lambda: sftlab.generate(Path("missing-run"), "Hi"),
        lambda: sftlab.evaluate("../missing-run", str(chat_file)),
    ):
        with pytest.raises(
            ModelLoadError, match="model path not found: .*never looked up on the Hugging Face Hub"
        ):
            call()
    assert no_hub == []
