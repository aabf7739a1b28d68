"""docs/python.md runs as written: every Python block in order, in one namespace, on the tiny model of
conftest.py (its first block, which names the model and the run length, replaced; that block as
written runs offline: tests/e2e/test_default_model_api.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import save_tiny_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer) -> Path:
    """conftest's tiny model with the default max_seq_length's positions (the examples keep the default)."""
    return save_tiny_model(tmp_path / "tiny-model", tokenizer, positions=2048)


def test_python_md_examples_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the examples write runs/ where they run
    first, *rest = blocks()
    assert "MODEL = sftlab.default_model()" in first and "QUICK = " in first
    namespace: dict = {}
    setup = first.replace("sftlab.default_model()", repr(str(tiny_model_dir)))
    setup = setup.replace('"train.max_steps": 20', '"train.max_steps": 2, "train.mixed_precision": "no"')
    exec(compile(setup, f"{DOC}[0]", "exec"), namespace)
    for k, block in enumerate(rest, 1):
        exec(compile(block, f"{DOC}[{k}]", "exec"), namespace)
    assert len(rest) == 7
    printed = capsys.readouterr().out
    assert namespace["result"].stopped.startswith("StopWhenLow.on_step_end at step 1")
    assert namespace["resumed"].steps == 2 and namespace["resumed"].stopped is None
    assert (tmp_path / "runs" / "py" / "FINISHED").is_file()
    assert (tmp_path / "runs" / "py-continued" / "adapter_model.safetensors").is_file()
    assert "'eval/gsm_loss':" in printed and len(namespace["data"].train) == 16
    assert namespace["trl_run"].stopped.startswith("StopAfter.on_step_end at step 1")
    assert "learning_rate=0.0001 -> optim.lr" in printed
