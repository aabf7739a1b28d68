"""The example configs in examples/: every one loads, its committed data is what examples/make_data.py
generates, it trains one optimizer step on a tiny model, and none of its rows is bad.

The one-step runs use the tiny Llama + BPE tokenizer of conftest.py. That tokenizer splits text into 2-3x
as many tokens as SmolLM2's, so those runs allow 4x the config's max_seq_length (nothing is dropped for
length). The checks against the real default tokenizer (no bad rows, nothing over max_seq_length, the
pretokenized ids decode to what they claim) are marked e2e: they need the converted default model.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from sftlab.config import load_config
from sftlab.trainer.data import prepare_run_data
from sftlab.trainer.loop import run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
IDS = [p.stem for p in CONFIGS]


def make_data_module():
    """examples/make_data.py, imported from its path (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("examples_make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer) -> Path:
    """conftest's tiny model, with positions for 4x the examples' max_seq_length (see the module docstring)."""
    from conftest import build_model

    d = tmp_path / "tiny-model"
    build_model(len(tokenizer), positions=4096).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def tiny_overrides(config: Path, model_dir: Path, out: Path) -> list[str]:
    """One optimizer step of 2 rows on the tiny model, no exact-match evaluation, 4x the sequence length."""
    max_len = load_config(config).data.max_seq_length
    return [
        f"model.name_or_path={model_dir}",
        "train.max_steps=1",
        f"train.output_dir={out}",
        "train.micro_batch_size=2",
        "train.grad_accum_steps=1",
        "match_eval=null",
        f"data.max_seq_length={4 * max_len}",
    ]


def test_there_are_examples():
    assert len(CONFIGS) >= 8, [p.name for p in CONFIGS]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_example_config_loads_with_its_files(config):
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    assert all(not Path(src["path"]).is_absolute() for src in raw["data"]["train"]), "data paths are relative"
    cfg = load_config(config)
    assert cfg.model.name_or_path == "default"
    assert cfg.train.output_dir.startswith("runs/"), (
        "outputs go under runs/ (relative to the working directory)"
    )
    for src in cfg.data.train + cfg.data.eval:
        assert Path(src.path).is_file() and Path(src.path).is_relative_to(EXAMPLES / "data"), src.path
    if cfg.data.chat_template is not None and cfg.data.chat_template.endswith(".jinja"):
        assert Path(cfg.data.chat_template).is_file()
    if cfg.match_eval is not None:
        assert Path(cfg.match_eval.path).is_file()
    assert cfg.train.max_steps is not None and cfg.train.max_steps <= 20, "examples are short runs"


def test_every_format_and_feature_has_an_example():
    cfgs = {p.stem: load_config(p) for p in CONFIGS}
    formats = {s.format for c in cfgs.values() for s in c.data.train}
    assert {"messages", "prompt_completion", "alpaca", "sharegpt", "text", "pretokenized"} <= formats
    assert any(c.data.packing == "bfd" and c.checkpoint.every_steps for c in cfgs.values())
    assert any(c.peft is not None for c in cfgs.values())
    tools = [c for c in cfgs.values() if (c.data.chat_template or "").endswith("chatml_tools.jinja")]
    assert tools, "the tool-calling example uses the shipped ChatML-with-tools template"
    rows = read_jsonl(Path(tools[0].data.train[0].path))
    assert all(r["tools"] and r["messages"][0]["role"] == "system" for r in rows)
    assert any(m.get("tool_calls") for r in rows for m in r["messages"])
    assert any(m["role"] == "tool" for r in rows for m in r["messages"])


def test_committed_data_is_what_make_data_generates():
    """Everything but pretokenized.jsonl (which needs the real tokenizer: see the e2e test)."""
    make_data = make_data_module()
    generated = make_data.datasets(skip_pretokenized=True)
    on_disk = sorted(p.name for p in (EXAMPLES / "data").glob("*.jsonl"))
    assert on_disk == sorted([*generated, "pretokenized.jsonl"])
    for name, rows in generated.items():
        assert (EXAMPLES / "data" / name).read_text(encoding="utf-8") == make_data.to_jsonl(rows), name
    total = sum(p.stat().st_size for p in (EXAMPLES / "data").iterdir())
    assert total < 1_000_000, f"example data is {total} bytes"


def test_math_answers_end_with_the_number_and_eval_is_held_out():
    train, held = (
        read_jsonl(EXAMPLES / "data" / "math.jsonl"),
        read_jsonl(EXAMPLES / "data" / "math_eval.jsonl"),
    )
    for row in train + held:
        assert re.search(r"\n#### \d+$", row["completion"]), row
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


def test_pretokenized_ids_fit_the_tiny_tokenizer(tokenizer):
    """The committed ids are SmolLM2's, and all below 400: they fit the tiny test tokenizer too."""
    for row in read_jsonl(EXAMPLES / "data" / "pretokenized.jsonl"):
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels) and max(ids) < len(tokenizer)
        assert all(label in (-100, i) for i, label in zip(ids, labels))
        assert labels[0] == -100 and labels[-1] == ids[-1] == tokenizer.eos_token_id == 2


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_example_trains_one_step_on_a_tiny_model(config, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(config, tiny_overrides(config, tiny_model_dir, out))
    report = prepare_run_data(cfg).report
    assert report.bad == 0, report.bad_examples
    assert report.overlength_dropped == 0 and report.overlength_truncated == 0, report.summary()
    result = run_training(cfg)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and result.steps == 1
    assert metrics[0]["target_tokens"] > 0 and metrics[0]["loss"] > 0


def test_tool_calls_are_trained_and_tool_results_are_not(tiny_model_dir, tokenizer, tmp_path):
    """In the tools example, the targets of a conversation are its assistant text, tool calls and
    <|im_end|> tokens; the system prompt, the tool schemas, user turns and tool results carry no loss."""
    config = EXAMPLES / "tools.yaml"
    data = prepare_run_data(load_config(config, tiny_overrides(config, tiny_model_dir, tmp_path / "run")))
    seen_call = False
    for i in range(len(data.train)):
        ex = data.train[i]
        targets = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != -100])
        context = tokenizer.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == -100])
        assert "<tool_response>" not in targets and "# Tools" not in targets and "<tools>" in context
        seen_call |= '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' in targets
    assert seen_call


def test_tools_template_renders_plain_conversations_as_smollm2_does():
    """Without tools the shipped template is SmolLM2's own (conftest.CHATML_TEMPLATE), generation prompt included."""
    from conftest import CHATML_TEMPLATE, CONVERSATIONS

    from sftlab.data.rendering import render

    template = (EXAMPLES / "templates" / "chatml_tools.jinja").read_text(encoding="utf-8")
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            assert render(template, messages, prompt) == render(CHATML_TEMPLATE, messages, prompt)


def test_packing_example_checkpoints_and_resumes(tiny_model_dir, tmp_path):
    """The packing example writes checkpoints; `train.resume=auto` picks the latest one up."""
    config = EXAMPLES / "packing_resume.yaml"
    overrides = tiny_overrides(config, tiny_model_dir, tmp_path / "run") + ["checkpoint.every_steps=1"]
    run_training(load_config(config, overrides))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-00000001"]
    (
        tmp_path / "run" / "FINISHED"
    ).unlink()  # as if killed after its checkpoint (a finished run has nothing to resume)
    printed = io.StringIO()
    again = run_training(
        load_config(config, overrides + ["train.resume=auto"]), Console(file=printed, width=400)
    )
    assert "resumed from" in printed.getvalue() and "step-00000001 at step 1" in printed.getvalue()
    assert again.steps == 1 and not re.search(
        r"^step ", printed.getvalue(), re.MULTILINE
    )  # nothing left to train
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1]


# --- with the real default tokenizer (SmolLM2-135M-Instruct) ----------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_example_data_has_no_bad_rows_with_the_default_tokenizer(config):
    """The data report of each example as `sftlab prepare` prints it: nothing bad, nothing over length."""
    report = prepare_run_data(load_config(config, ["data.cache=false"])).report
    assert report.rows > 0 and report.bad == 0, report.bad_examples
    assert report.overlength_dropped == 0 and report.overlength_truncated == 0, report.summary()


@pytest.mark.e2e
def test_pretokenized_ids_are_the_default_tokenizers_encoding():
    from sftlab.config.schema import ModelConfig
    from sftlab.model.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    make_data = make_data_module()
    rows = read_jsonl(EXAMPLES / "data" / "pretokenized.jsonl")
    assert rows == make_data.pretokenized_rows(random.Random(make_data.SEED + 6), tokenizer=tok)
    for row in rows:
        text = tok.decode(row["input_ids"])
        a, op, b, c = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)<\|im_end\|>", text).groups()
        assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        answer = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert tok.decode(answer) == c + "<|im_end|>"
