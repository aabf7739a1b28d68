"""End-to-end on the real default model (SmolLM2-135M-Instruct from the embedded GGUF).

Marked `e2e` (a few minutes in all on a 2-core CPU; each run as short as what it checks allows): skip locally with `-m "not e2e"`; CI runs it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.cli import main
from sftlab.config.schema import ModelConfig
from sftlab.model.loading import default_gguf_path, load_model, resolve_model_path

pytestmark = pytest.mark.e2e


def test_gguf_conversion_is_a_plain_float_checkpoint():
    path = resolve_model_path(ModelConfig())
    assert path == resolve_model_path(ModelConfig(name_or_path=str(default_gguf_path())))  # cached by hash
    cfg = json.loads(open(f"{path}/config.json").read())
    assert "quantization_config" not in cfg
    model = load_model(ModelConfig())
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) > 100_000_000


def test_demo_config_trains_saves_and_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "train.max_steps=2",
            "train.micro_batch_size=4",
            "train.grad_accum_steps=1",
            f"train.output_dir={out}",
            "match_eval.max_examples=4",
            "data.eval_fraction=0.02",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "exact match before training" in text and "exact match after training" in text
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 for m in metrics)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    msgs = [
        {"role": "system", "content": "Convert the date to YYYY-MM-DD format."},
        {"role": "user", "content": "March 5, 2021"},
    ]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert tok.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_lora_demo_learns_and_its_adapter_loads_by_name(tmp_path, capsys):
    """The documented LoRA demo (src/sftlab/demo/demo_lora.yaml), shortened to 4 of its 12 steps of one
    micro-batch each (not 3) and 10 of its 100 held-out dates (the whole demo, >= 95/100, is `make
    demo-lora`): it learns the task and its adapter, saved with the base as configured (`default`), loads
    by name."""
    from importlib.resources import files

    out = tmp_path / "lora"
    config = str(files("sftlab") / "demo" / "demo_lora.yaml")
    assert (
        main(
            [
                "train",
                config,
                f"train.output_dir={out}",
                "train.max_steps=4",
                "train.grad_accum_steps=1",
                "match_eval.max_examples=10",
            ]
        )
        == 0
    )
    match = json.loads((out / "match_eval.json").read_text())
    assert match["after"]["correct"] >= match["before"]["correct"] + 3, (
        match
    )  # measured (AVX2 fp32): 0/10 -> 6/10
    assert json.loads((out / "sftlab_base.json").read_text())["name_or_path"] == "default"
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                str(out),
                "--system",
                "Rewrite the date as YYYY-MM-DD. Reply with the date only.",
                "--prompt",
                "5 March 2021",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", capsys.readouterr().out.strip())


def test_generate_default_answers_with_the_base_model(capsys):
    """`sftlab generate default` (to compare a run with the model it started from)."""
    assert (
        main(
            [
                "generate",
                "default",
                "--system",
                "Rewrite the date as YYYY-MM-DD. Reply with the date only.",
                "--prompt",
                "5 March 2021",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip()
