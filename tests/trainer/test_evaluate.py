"""`sftlab eval`: loss and perplexity over target tokens equal the training objective; exact match; JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from test_loop import make_cfg

from sftlab.cli import main as cli_main
from sftlab.config.schema import DataConfig, SourceConfig
from sftlab.data.collate import pad_collate
from sftlab.data.dataset import build_datasets
from sftlab.trainer.evaluate import evaluate, load_model_dir
from sftlab.trainer.loop import run_training


def test_eval_loss_is_the_mean_target_nll(tiny_model_dir, chat_file, tmp_path):
    res = evaluate(tiny_model_dir, str(chat_file))
    model, tok = load_model_dir(tiny_model_dir)
    examples, _, _ = build_datasets(
        DataConfig(train=[SourceConfig(path=str(chat_file))], cache=False), tok, seed=0
    )
    total, count = 0.0, 0
    with torch.no_grad():  # reference: one example at a time, mean over its shifted target positions
        for ex in examples:
            batch = pad_collate([ex], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[
                0, :-1
            ]
            labels = batch["labels"][0, 1:]
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert res["target_tokens"] == count and res["examples"] == len(examples) == 16
    assert math.isclose(res["loss"], total / count, rel_tol=1e-5)
    assert math.isclose(res["perplexity"], math.exp(total / count), rel_tol=1e-5)


def test_eval_cli_on_a_run_dir_with_match_and_json(tiny_model_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    run_training(make_cfg(tiny_model_dir, chat_file, out))
    data = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
        ],
    )
    capsys.readouterr()
    assert (
        cli_main(["eval", str(out), "--data", str(data), "--match", "--json", "--max-new-tokens", "4"]) == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert (
        res["examples"] == 2
        and res["target_tokens"] > 0
        and res["loss"] > 0
        and res["loss_on"] == "assistant"
    )
    assert res["exact_match"]["total"] == 2 and 0 <= res["exact_match"]["accuracy"] <= 1
    assert cli_main(["eval", str(out), "--data", str(data)]) == 0
    text = capsys.readouterr().out
    assert "loss " in text and "perplexity" in text and "2 examples" in text
    assert cli_main(["eval", str(tmp_path), "--data", str(data)]) == 2  # not a model directory


def test_eval_maps_the_files_own_field_names(tiny_model_dir, tmp_path, capsys):
    """--columns/--roles (or the run's own mapping) read a GSM8K-style or ShareGPT-style file exactly
    as the equivalent native rows: same loss, same target count, same exact-match examples."""
    native = write_jsonl(
        tmp_path / "native.jsonl",
        [{"prompt": "What is 2+3?", "completion": "5"}, {"prompt": "What is 4*2?", "completion": "8"}],
    )
    gsm = write_jsonl(
        tmp_path / "gsm.jsonl",
        [{"question": "What is 2+3?", "answer": "5"}, {"question": "What is 4*2?", "answer": "8"}],
    )
    want = evaluate(tiny_model_dir, str(native), match=True, max_new_tokens=2)
    got = evaluate(
        tiny_model_dir,
        str(gsm),
        match=True,
        max_new_tokens=2,
        columns={"prompt": "question", "completion": "answer"},
    )
    assert (got["target_tokens"], got["loss"]) == (want["target_tokens"], want["loss"]) and got[
        "examples"
    ] == 2
    assert got["exact_match"]["samples"] == want["exact_match"]["samples"]
    assert got["mapping"]["from"] == "given"
    chat = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"chat": [{"who": "human", "text": "What is 2+3?"}, {"who": "bot", "text": "5"}]}],
    )
    assert (
        cli_main(
            [
                "eval",
                str(tiny_model_dir),
                "--data",
                str(chat),
                "--json",
                "--columns",
                "conversations=chat,from=who,value=text",
                "--roles",
                "human=user,bot=assistant",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert (
        res["examples"] == 1
        and res["target_tokens"] == evaluate(tiny_model_dir, str(native), max_examples=1)["target_tokens"]
    )
    assert cli_main(["eval", str(tiny_model_dir), "--data", str(gsm), "--columns", "promt=question"]) == 2
    assert "did you mean prompt?" in capsys.readouterr().out
    assert cli_main(["eval", str(tiny_model_dir), "--data", str(gsm)]) == 2  # unmapped: no format fits


def test_eval_of_a_run_uses_the_runs_own_mapping(tiny_model_dir, tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": f"{i + 1}"} for i in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(tiny_model_dir, train, tmp_path / "run", max_steps=1)
    cfg.data.train[0].columns = {"prompt": "question", "completion": "answer"}
    run_training(cfg)
    res = evaluate(tmp_path / "run", str(train))
    assert res["mapping"]["from"] == "the run's training sources" and res["examples"] == 8


def _eval_run(model_dir, rows, tmp_path, name, **data):
    from conftest import chat_rows, write_jsonl

    import sftlab

    cap = data.pop("_cap", None)
    train = write_jsonl(tmp_path / "train.jsonl", chat_rows())
    evals = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return sftlab.train(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"train": [str(train)], "eval": [str(evals)], "max_seq_length": 128, **data},
            "optim": {"lr": 3e-3},
            "train": {
                "output_dir": str(tmp_path / name),
                "max_steps": 2,
                "micro_batch_size": 3,
                "eval_every": 1,
                "eval_max_batches": cap,
            },
        }
    )


def test_packed_eval_equals_unpacked_and_max_batches_caps_it(tiny_model_dir, tmp_path):
    from conftest import chat_rows

    rows = chat_rows()[::2]
    plain = _eval_run(tiny_model_dir, rows, tmp_path, "plain")
    packed = _eval_run(tiny_model_dir, rows, tmp_path, "packed", eval_packing=True)
    assert [r["eval_loss"] for r in packed.history] == pytest.approx(
        [r["eval_loss"] for r in plain.history], rel=1e-5
    )
    capped = _eval_run(tiny_model_dir, rows, tmp_path, "capped", _cap=1)
    first = _eval_run(tiny_model_dir, rows[:3], tmp_path, "first")
    assert [r["eval_loss"] for r in capped.history] == [r["eval_loss"] for r in first.history]
    assert capped.history[0]["eval_loss"] != plain.history[0]["eval_loss"]


def test_a_missing_run_or_file_fails_before_any_model_loads(
    tiny_model_dir, chat_file, tmp_path, monkeypatch, no_hub
):
    """`./run` stays a local path (it was sent to the Hub as `run`, retried for a minute); a missing data file
    is named before the model loads."""
    from sftlab.data.types import DataError
    from sftlab.model.loading import ModelLoadError
    from sftlab.trainer import evaluate as evaluate_module

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ModelLoadError, match="model path not found: ./missing-run.*never looked up on the Hugging"
    ):
        evaluate("./missing-run", str(chat_file))
    assert no_hub == []
    monkeypatch.setattr(evaluate_module, "load_model_dir", lambda spec: pytest.fail("loaded the model"))
    with pytest.raises(DataError, match="data source not found: missing.jsonl"):
        evaluate(tiny_model_dir, "./missing.jsonl")
