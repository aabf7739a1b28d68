"""The objective seam (trainer/objective.py): docs/architecture.md's worked example, a per-example mean
NLL, trains through `sftlab.train(objective=...)` without any change to the loop, and its logged loss is
the hand-computed mean of per-example means, with and without gradient accumulation."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import build_model

import sftlab
from sftlab.data.collate import epoch_order, pad_collate
from sftlab.data.types import IGNORE_INDEX

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def doc_objective():
    """The PerExampleMean class, executed from the documentation's code block."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    block = next(b for b in blocks if "class PerExampleMean" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    return namespace["PerExampleMean"]


def hand_computed(model, examples, pad_id) -> float:
    batch = pad_collate(list(examples), pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    means = []
    for row in range(len(examples)):
        labels = batch["labels"][row, 1:]
        keep = labels != IGNORE_INDEX
        nll = torch.nn.functional.cross_entropy(logits[row, :-1][keep], labels[keep], reduction="mean")
        means.append(nll.item())
    return sum(means) / len(means)


@pytest.mark.parametrize("micro,accum", [(8, 1), (4, 2)], ids=["one-batch", "accumulated"])
def test_the_documented_objective_trains_without_loop_changes(
    tiny_model_dir, chat_file, tokenizer, tmp_path, micro, accum
):
    config = {
        "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"train": str(chat_file), "max_seq_length": 256},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {
            "output_dir": str(tmp_path / "run"),
            "micro_batch_size": micro,
            "grad_accum_steps": accum,
            "max_steps": 2,
            "mixed_precision": "no",
            "num_epochs": 1,
        },
    }
    data = sftlab.prepare(config)
    objective = doc_objective()()
    result = sftlab.train(config, objective=objective)
    first = result.history[0]
    assert "examples" in first and "target_tokens" not in first and first["examples"] == 8
    # step 1 saw the first 8 examples of epoch 0's seeded order, before any update
    picked = epoch_order(len(data.train), 42, 0)[:8]
    expected = hand_computed(build_model(len(tokenizer)), [data.train[i] for i in picked], data.pad_id)
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    # and it is not the token-weighted mean SFT logs
    sft = sftlab.train(config, **{"train.output_dir": str(tmp_path / "sft")})
    assert sft.history[0]["loss"] != pytest.approx(first["loss"], rel=1e-4)
