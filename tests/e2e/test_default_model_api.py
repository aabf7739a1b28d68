"""`sftlab.default_model()` on the real default model (SmolLM2-135M-Instruct from the embedded GGUF): the
first block of docs/python.md runs offline as written, and a run from the loaded object records `default`.

Marked `e2e` (the real model; a few seconds once the GGUF is converted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import CONVERSATIONS

import sftlab
from sftlab.config.schema import ModelConfig
from sftlab.model.loading import resolve_model_path

pytestmark = pytest.mark.e2e
DOC = Path(__file__).resolve().parents[2] / "docs" / "python.md"


def test_python_md_first_block_runs_offline_as_written(no_hub):
    first = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)[0]
    namespace: dict = {}
    exec(compile(first, f"{DOC}[0]", "exec"), namespace)
    assert namespace["MODEL"] == resolve_model_path(ModelConfig(name_or_path="default"))
    assert (Path(namespace["MODEL"]) / "config.json").is_file() and no_hub == []


def test_a_run_from_the_loaded_default_model_records_default(tmp_path, no_hub):
    model, tokenizer = sftlab.default_model(load=True)
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    out = tmp_path / "run"
    sftlab.train(
        model,
        tokenizer=tokenizer,
        train_dataset=[{"messages": c} for c in CONVERSATIONS],
        peft={"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
        **{"train.max_steps": 1, "data.max_seq_length": 128, "train.output_dir": str(out)},
    )
    assert json.loads((out / "sftlab_base.json").read_text())["name_or_path"] == "default"
    assert no_hub == []
