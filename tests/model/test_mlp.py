"""The SwiGLU MLP recomputing silu in its backward: bitwise autograd's values and gradients, fewer saved
tensors, only Llama-form MLPs with SiLU changed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import build_model
from torch import nn

from sftlab.model import mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_autograds_silu_times_up_bitwise_and_saves_two_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(64, 96, generator=g).to(dtype) for _ in range(3))
    results = []
    for fn in (lambda a, b: torch.nn.functional.silu(a) * b, mlp.swiglu):
        a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = fn(a, b)
        out.backward(grad)
        results.append((out.detach(), a.grad, b.grad, len(saved)))
    (out0, ga0, gb0, n0), (out1, ga1, gb1, n1) = results
    assert torch.equal(out0, out1) and torch.equal(ga0, ga1) and torch.equal(gb0, gb1)
    assert (n0, n1) == (3, 2)  # autograd keeps gate, silu(gate) and up; swiglu gate and up


@pytest.mark.parametrize("autocast", [False, True])
def test_llama_mlps_recompute_silu_and_train_bitwise_as_before(autocast):
    reference, model = build_model(90, seed=3, layers=3), build_model(90, seed=3, layers=3)
    model.model.layers[2].mlp.act_fn = nn.GELU()  # not SiLU: left as it is
    reference.model.layers[2].mlp.act_fn = nn.GELU()
    keys = list(model.state_dict())
    assert mlp.recompute_swiglu(model) == 2
    assert mlp.recompute_swiglu(model) == 0  # once
    assert type(model.model.layers[0].mlp).__name__ == "SwiGLURecomputedLlamaMLP"
    assert type(model.model.layers[2].mlp).__name__ == "LlamaMLP" and list(model.state_dict()) == keys
    ids = torch.randint(3, 90, (2, 17), generator=torch.Generator().manual_seed(4))
    losses = []
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad), name
    restored = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert type(restored.model.layers[0].mlp) is type(model.model.layers[0].mlp)


def test_an_mlp_with_another_forward_is_left_alone():
    class OtherMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    model = nn.Sequential(OtherMLP())
    assert mlp.recompute_swiglu(model) == 0 and type(model[0]) is OtherMLP
