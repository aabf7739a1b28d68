"""Model FLOPs per token: 6N for a full fine-tune, 4N plus 2 x the trainable matmul weights when frozen."""

from __future__ import annotations

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
