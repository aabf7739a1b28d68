"""The `sftlab` command: config show, generate, chat, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import sys

import pytest
import yaml

from sftlab.cli import main


def test_config_show_prints_the_resolved_demo_config(capsys):
    assert main(["config", "show", "optim.lr=3e-4"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["optim"]["lr"] == 3e-4 and tree["model"]["name_or_path"] == "default"
    assert tree["train"]["max_steps"] == 12  # the demo config, with every default filled in


def test_bad_override_is_one_clear_error(capsys):
    assert main(["config", "show", "optim.lrr=1"]) == 2
    out = capsys.readouterr().out
    assert "optim.lrr: unknown key" in out and "Traceback" not in out


def test_train_with_missing_model_fails_cleanly(tmp_path, chat_file, capsys):
    rc = main(
        [
            "train",
            f"model.name_or_path={tmp_path}/nope",
            f"data.train.0.path={chat_file}",
            f"train.output_dir={tmp_path}/run",
        ]
    )
    assert rc == 2 and "model path not found" in capsys.readouterr().out


def test_generate_and_chat_on_a_saved_model(tiny_model_dir, capsys, monkeypatch):
    assert main(["generate", str(tiny_model_dir), "--prompt", "Hello!", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello!\n/reset\nTell me a joke.\n/exit\n"))
    assert main(["chat", str(tiny_model_dir), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("model>") == 2
    assert "you>" not in out and "/reset clears" not in out  # piped input: no prompt, no banner


def test_tools_file_reaches_the_chat_template(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from conftest import build_tokenizer, save_tiny_model
    from transformers import PreTrainedTokenizerBase

    from sftlab.data.templates import BUILTIN_TEMPLATES

    tools = tmp_path / "tools.json"  # a bare schema, as glaive rows store them
    tools.write_text(
        json.dumps(
            [
                {
                    "name": "get_weather",
                    "description": "Get the weather in a city",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                }
            ]
        )
    )
    prompts = []
    real = PreTrainedTokenizerBase.apply_chat_template
    monkeypatch.setattr(
        PreTrainedTokenizerBase,
        "apply_chat_template",
        lambda self, *a, **kw: prompts.append(real(self, *a, **kw)) or prompts[-1],
    )
    model = save_tiny_model(tmp_path / "tools-model", build_tokenizer(BUILTIN_TEMPLATES["chatml_tools"]))
    assert (
        main(
            [
                "generate",
                str(model),
                "--prompt",
                "Weather in Paris?",
                "--tools",
                str(tools),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert prompts[-1].startswith("<|im_start|>system\n# Tools\n") and prompts[-1].endswith(
        "<|im_start|>assistant\n"
    )
    assert (
        '<tools>\n{"type": "function", "function": {"name": "get_weather", "description": "Get the weather'
        in prompts[-1]
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("Weather in Paris?\n"))
    assert main(["chat", str(model), "--tools", str(tools), "--max-new-tokens", "2"]) == 0
    assert "<tools>" in prompts[-1] and capsys.readouterr().out.count("model>") == 1
    # a template that drops the schemas (SmolLM2's) is refused, not silently ignored
    assert main(["generate", str(tiny_model_dir), "--prompt", "Hi", "--tools", str(tools)]) == 2
    assert "the model's chat template does not render them" in capsys.readouterr().out


def test_tool_rows_stop_training_or_train_with_drop_or_a_tool_template(
    tmp_path, tiny_model_dir, capsys, caplog, monkeypatch
):
    """glaive-style ShareGPT tool rows: one error naming the row before training (SmolLM2's template drops
    them); data.tools=drop trains without them under one warning; chatml_tools trains them and the run
    keeps that template, so `generate RUN --tools` renders the schemas."""
    from pathlib import Path

    glaive = Path(__file__).parent / "data" / "fixtures" / "glaive_toolcall_demo.json"
    args = [
        "train",
        "--data",
        str(glaive),
        "--model",
        str(tiny_model_dir),
        "data.max_seq_length=512",
        "train.max_steps=1",
        "train.micro_batch_size=2",
        "data.cache=false",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    out = capsys.readouterr().out
    assert (
        f"error: {glaive} row 2: the row has tool schemas" in out
        and "data.chat_template: chatml_tools" in out
    )
    assert not (tmp_path / "a" / "model.safetensors").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "data.tools=drop"]) == 0
    assert [r.getMessage()[:26] for r in caplog.records if "does not render" in r.getMessage()] == [
        "2 rows carry tools, tool c"
    ]
    run = tmp_path / "c"
    assert main([*args, "--out", str(run), "data.chat_template=chatml_tools"]) == 0
    tools = tmp_path / "tools.json"
    tools.write_text(
        json.loads(glaive.read_text())[1]["tools"]
    )  # the row's schemas (a JSON string of a list)
    from transformers import PreTrainedTokenizerBase

    prompts = []
    real = PreTrainedTokenizerBase.apply_chat_template
    monkeypatch.setattr(
        PreTrainedTokenizerBase,
        "apply_chat_template",
        lambda self, *a, **kw: prompts.append(real(self, *a, **kw)) or prompts[-1],
    )
    assert (
        main(
            [
                "generate",
                str(run),
                "--prompt",
                "Area of a 2x3 rectangle?",
                "--tools",
                str(tools),
                "--max-new-tokens",
                "2",
            ]
        )
        == 0
    )
    assert '{"type": "function", "function": {"name": "calculate_area"' in prompts[-1]


@pytest.mark.parametrize(
    "content,why",
    [
        ('[{"name": ', "invalid JSON: Expecting value (line 1, column 11)"),
        ('{"name": "get_weather"}', "got one JSON object (put it in [ ])"),
        ("[]", "got an empty list"),
        ('[{"name": "f"}, "g"]', "item 1 is a str, not a tool schema"),
    ],
)
def test_a_bad_tools_file_is_one_error_naming_it(tmp_path, capsys, content, why):
    bad = tmp_path / "tools.json"
    bad.write_text(content)
    assert main(["generate", str(tmp_path / "no-model-needed"), "--prompt", "Hi", "--tools", str(bad)]) == 2
    out = capsys.readouterr().out
    assert f"--tools {bad}: " in out and why in out and "Traceback" not in out


def test_sampling_is_seeded_and_checked(tiny_model_dir, capsys):
    args = [
        "generate",
        str(tiny_model_dir),
        "--prompt",
        "Hello!",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.5",
        "--top-p",
        "0.95",
    ]
    replies = []
    for _ in range(2):
        assert main(args + ["--seed", "3"]) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1] and replies[0].strip()
    assert main(args[:-4] + ["--temperature", "-1"]) == 2
    assert "--temperature must be >= 0" in capsys.readouterr().out


def test_generate_default_uses_the_embedded_model(tiny_model_dir, capsys, monkeypatch):
    """`default` resolves as in training (model/loading.py; here the GGUF conversion is replaced by the tiny model)."""
    from sftlab.model import loading

    asked = []
    monkeypatch.setattr(loading, "default_gguf_path", lambda: tiny_model_dir / "SmolLM2.gguf")
    monkeypatch.setattr(loading, "convert_gguf", lambda path: asked.append(path.name) or tiny_model_dir)
    assert main(["generate", "default", "--prompt", "Hello!", "--max-new-tokens", "2"]) == 0
    assert asked and set(asked) == {"SmolLM2.gguf"}


def test_train_data_flag_builds_the_config_from_library_defaults(tiny_model_dir, chat_file, tmp_path, capsys):
    from sftlab.config import SFTConfig, load_config

    out = tmp_path / "quick"
    assert (
        main(
            [
                "train",
                "--data",
                str(chat_file),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(out),
                "data.max_seq_length=256",
                "train.max_steps=2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "no config file: the library defaults" in printed and f"output_dir: {out}" in printed
    expected = SFTConfig.model_validate(
        {
            "model": {"name_or_path": str(tiny_model_dir)},
            "data": {"train": str(chat_file), "max_seq_length": 256},
            "train": {"output_dir": str(out), "max_steps": 2},
        }
    )
    assert (
        load_config(out / "config.yaml") == expected
    )  # every other key: the typed default, none from the demo
    assert expected.match_eval is None and expected.optim.lr == 2e-5 and expected.train.micro_batch_size == 8


def test_data_train_shorthand_without_a_config_starts_from_the_defaults(capsys):
    assert main(["config", "show", "data.train=x.jsonl"]) == 0
    tree = yaml.safe_load(capsys.readouterr().out)
    assert tree["data"]["train"] == [
        {
            "path": "x.jsonl",
            "name": None,
            "format": "auto",
            "weight": None,
            "split": "train",
            "subset": None,
            "columns": {},
            "roles": {},
            "response_template": None,
            "instruction_template": None,
        }
    ]
    assert tree["train"]["output_dir"] == "runs/sft" and tree["match_eval"] is None  # not the demo's
    assert main(["config", "show", "optim.lr=1e-4"]) == 0  # no training data given: still the demo
    assert yaml.safe_load(capsys.readouterr().out)["train"]["output_dir"] == "runs/demo"


def test_a_mistyped_data_file_fails_at_once_with_a_suggestion(tmp_path, monkeypatch, capsys):
    from conftest import write_jsonl

    from sftlab.data import sources

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "gsm8k_pc.jsonl", [{"prompt": "1+1", "completion": "2"}])
    monkeypatch.setattr(sources.datasets, "load_dataset", lambda *a, **k: pytest.fail("tried the hub"))
    assert main(["train", "--data", "data/gsm8k_pc.jsnol"]) == 2
    assert "did you mean data/gsm8k_pc.jsonl?" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_data_flag_sets_the_paths_and_dotted_source_overrides_apply_on_top(tmp_path, tiny_model_dir, capsys):
    """`--data FILE 'data.train.0.columns=...'`: the flag gives data.train, the user's keys inside it are kept."""
    from conftest import write_jsonl

    assert (
        main(
            [
                "config",
                "show",
                "--data",
                "a.jsonl",
                "--data",
                "b.jsonl",
                "data.train.0.columns={completion: response}",
                "data.train.0.weight=3",
                "data.train.1.name=second",
            ]
        )
        == 0
    )
    train = yaml.safe_load(capsys.readouterr().out)["data"]["train"]
    assert [s["path"] for s in train] == ["a.jsonl", "b.jsonl"]
    assert train[0]["columns"] == {"completion": "response"} and train[0]["weight"] == 3
    assert train[1]["name"] == "second" and train[1]["columns"] == {} and train[1]["weight"] is None
    # and the run reads the file through them: every row names its answer `response`
    data = write_jsonl(
        tmp_path / "renamed.jsonl",
        [{"prompt": f"Count to {i}", "response": " ".join("x" * i)} for i in range(1, 5)],
    )
    assert (
        main(
            [
                "prepare",
                "--data",
                str(data),
                "--model",
                str(tiny_model_dir),
                "data.train.0.columns={completion: response}",
                "data.train.0.weight=8",
                "data.max_seq_length=256",
                "data.cache=false",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train 8 examples" in printed and "error" not in printed


# Each command with a missing path, and what its one-line error says (DATA: an existing data file).
MISSING_PATHS = [
    (["train", "--data", "./missing.jsonl"], "data source not found: missing.jsonl"),
    (
        ["train", "--data", "DATA", "--model", "./missing-model"],
        "model.name_or_path: model path not found: ./missing-model",
    ),
    (["prepare", "--data", "./missing.jsonl"], "data source not found: missing.jsonl"),
    (
        ["prepare", "--data", "DATA", "model.tokenizer=./missing-tok"],
        "model.tokenizer: directory not found: ./missing-tok",
    ),
    (["eval", "./missing-run", "--data", "DATA"], "model path not found: ./missing-run"),
    (["eval", "default", "--data", "./missing.jsonl"], "data source not found: missing.jsonl"),
    (["generate", "./missing-run", "--prompt", "Hi"], "model path not found: ./missing-run"),
    (
        ["generate", "default", "--prompt", "Hi", "--image", "missing.png"],
        "--image: no such file: missing.png",
    ),
    (
        ["generate", "default", "--prompt", "Hi", "--tools", "missing.json"],
        "--tools: cannot read missing.json",
    ),
    (["chat", "../missing-run"], "model path not found: ../missing-run"),
    (["export", "./missing-run", "--merge", "--out", "merged"], "run directory not found: ./missing-run"),
    (["push", "./missing-run"], "run directory not found: ./missing-run"),
    (["report", "./missing-run"], "run directory not found: ./missing-run"),
]

RUN_EACH = """
import contextlib, io, json, sys
from sftlab.cli import main
for args in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
    heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
    print(json.dumps({"rc": rc, "out": out.getvalue(), "heavy": heavy}))
import transformers.utils.logging as hf_logging  # the library progress bars stay off, as before
print(json.dumps({"bars": hf_logging.is_progress_bar_enabled()}))
"""


def test_a_missing_path_is_named_before_torch_or_transformers_is_imported(tmp_path, chat_file):
    """Every command checks its paths first: a missing file, run directory or local-looking model answers with
    the path named and exit code 2, in a process that never imported torch nor transformers (which take
    seconds), and a local-looking model path is not looked up on the Hub."""
    import os
    import subprocess
    from pathlib import Path

    cases = [[str(chat_file) if a == "DATA" else a for a in args] for args, _ in MISSING_PATHS]
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", RUN_EACH, json.dumps(cases)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and len(lines) == len(cases) + 1, proc.stderr
    for (args, message), res in zip(MISSING_PATHS, lines):
        assert res["rc"] == 2 and message in res["out"] and "Traceback" not in res["out"], (args, res)
        assert res["heavy"] == [], (args, res)
        if "model path" in message:
            assert "never looked up on the Hugging Face Hub" in res["out"], (args, res)
    assert lines[-1] == {"bars": False}
