"""Model FLOPs per token: 6N for a full fine-tune, 4N plus 2 x the trainable matmul weights when frozen."""

from __future__ import annotations

import pytest

from sftlab.trainer.throughput import FlopCounter, dense_params
from tests.conftest import build_model


def test_frozen_weights_need_no_weight_gradient_flops():
    model = build_model(400)
    n = dense_params(model)
    embed = model.get_input_embeddings().weight.numel()
    matmuls = sum(
        p.numel() for p in model.parameters() if p.ndim >= 2
    )  # the tied head counts once, as the head
    assert n == matmuls and n > embed
    assert FlopCounter(model).dense == 6 * n
    for p in model.parameters():
        p.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.requires_grad_(True)
    assert dense_params(model, trainable_only=True) == q.numel()
    assert FlopCounter(model).dense == 4 * n + 2 * q.numel()
    counter = FlopCounter(model)
    assert counter.step_flops(10, 0) == 10 * counter.dense


def test_step_flops_by_hand_with_the_target_only_head():
    """The tiny Llama of tests/conftest.py by hand: hidden 32, MLP 64, 2 layers, 4 heads of 8 with 2 KV
    heads, a tied 400 x 32 head. Per layer: q 32x32, k 32x16, v 32x16, o 32x32, gate/up 32x64, down 64x32."""
    model = build_model(400)
    per_layer = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32 + 3 * 32 * 64
    body, head = 2 * per_layer, 400 * 32
    full, target = FlopCounter(model), FlopCounter(model, target_head=True)
    assert full.body == 6 * body and full.head == 6 * head and full.dense == 6 * (body + head)
    tokens, targets, sum_sq = 10, 3, 4**2 + 6**2  # two documents of 4 and 6 tokens
    attention = 6 * 2 * (4 * 8) * sum_sq
    assert full.step_flops(tokens, sum_sq, targets) == 6 * (body + head) * tokens + attention
    assert target.step_flops(tokens, sum_sq, targets) == 6 * body * tokens + 6 * head * targets + attention
    for p in model.parameters():  # LoRA-like: only q of layer 0 trains; the frozen head needs no weight grad
        p.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    frozen = FlopCounter(model, target_head=True)
    assert frozen.body == 4 * body + 2 * 32 * 32 and frozen.head == 4 * head


def test_the_peak_is_probed_on_the_models_matmul_shape(tiny_model_dir, chat_file, tmp_path):
    import json

    from test_loop import make_cfg

    from sftlab.trainer.loop import run_training
    from sftlab.trainer.throughput import measure_peak_flops, model_shape

    model = build_model(400)
    assert model_shape(model, 2 * 256) == (512, 32, 64) and model_shape(model, 10**6)[0] == 4096
    import torch

    assert measure_peak_flops(torch.device("cpu"), torch.float32, 0.01, shape=(64, 32, 64)) > 0
    out = tmp_path / "run"
    run_training(make_cfg(tiny_model_dir, chat_file, out, max_steps=1, mixed_precision="no"))
    run = json.loads((out / "run.json").read_text())
    assert run["reasons"]["peak_flops"].startswith("measured: float32 matmuls 1024x")  # 4 rows x 256 tokens
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["model_gflops_per_s"] > 0 and record["mfu"] > 0
    assert record["model_gflops_per_s"] * 1e9 == pytest.approx(record["mfu"] * run["peak_flops"], rel=1e-2)
