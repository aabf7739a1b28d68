"""train.gradient_checkpointing: auto recomputes activations only when the planned micro-batch's would not fit."""

from __future__ import annotations

import json

import pytest
import torch
from test_loop import make_cfg

from sftlab.config import SFTConfig
from sftlab.trainer import recompute
from sftlab.trainer.loop import run_training


def test_the_activation_estimate_scales_with_tokens_layers_and_dtype(tiny_model):
    one = recompute.activation_bytes(tiny_model, 1000, torch.float32)
    assert recompute.activation_bytes(tiny_model, 2000, torch.float32) == 2 * one
    assert recompute.activation_bytes(tiny_model, 1000, torch.bfloat16) * 2 == one
    cfg = (
        tiny_model.config
    )  # 2 layers, hidden 32, 2 of 4 heads for k/v, ffn 64: (9*32 + 2*16 + 4*64) * 4 bytes
    assert one == 1000 * cfg.num_hidden_layers * (9 * 32 + 2 * 16 + 4 * 64) * 4


def test_auto_recomputes_only_when_the_activations_do_not_fit(tiny_model, monkeypatch):
    need = recompute.activation_bytes(tiny_model, 4096, torch.float32)
    params = sum(p.numel() for p in tiny_model.parameters())
    monkeypatch.setattr(recompute, "free_bytes", lambda device: 12 * params + 10 * need)
    on, why = recompute.decide("auto", tiny_model, 4096, torch.float32, "cpu")
    assert not on and "4,096 tokens" in why
    assert f"{(12 * params + 10 * need - 12 * params - need) / 2**30:.1f} GiB" in why.split("leaves")[1]
    monkeypatch.setattr(recompute, "free_bytes", lambda device: 12 * params + need)
    assert recompute.decide("auto", tiny_model, 4096, torch.float32, "cpu")[0]
    assert recompute.decide(True, tiny_model, 1, torch.float32, "cpu") == (True, "as configured")
    assert recompute.decide(False, tiny_model, 10**9, torch.float32, "cpu") == (False, "as configured")


def test_recomputing_keeps_the_layer_inputs_and_one_layer(tiny_model):
    """The activations kept with recompute: every layer's input plus one layer's own, far below all layers'."""
    cfg = tiny_model.config
    full = recompute.activation_bytes(tiny_model, 1000, torch.float32)
    kept = recompute.recomputed_bytes(tiny_model, 1000, torch.float32)
    assert kept == 1000 * cfg.num_hidden_layers * cfg.hidden_size * 4 + full // cfg.num_hidden_layers


def test_planned_tokens_is_the_longest_micro_batch():
    cfg = SFTConfig.model_validate({"data": {"max_seq_length": 512}, "train": {"micro_batch_size": 4}})
    assert recompute.planned_tokens(cfg, type("U", (), {"lengths": [100, 300, 200]})()) == 1200
    assert recompute.planned_tokens(cfg, None) == 2048
    cfg.train.micro_batch_tokens = 1024
    assert recompute.planned_tokens(cfg, None) == 1024


@pytest.mark.parametrize("setting", ["auto", True])
def test_the_resolved_choice_is_recorded_and_trains_the_same(setting, tiny_model_dir, chat_file, tmp_path):
    out = tmp_path / str(setting)
    res = run_training(make_cfg(tiny_model_dir, chat_file, out, max_steps=2, gradient_checkpointing=setting))
    info = json.loads((out / "run.json").read_text())
    assert info["gradient_checkpointing"] is (setting is True)  # a tiny model always fits: auto keeps them
    assert len(res.history) == 2
