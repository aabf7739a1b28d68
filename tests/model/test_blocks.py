"""The Llama-form blocks: the SwiGLU MLP recomputing silu in its backward (bitwise autograd's values and
gradients, fewer saved tensors) and RMSNorm's closed-form backward (bitwise forward, gradients to float32
rounding); only Llama-form classes changed."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from conftest import build_model
from torch import nn

from sftlab.model import blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_is_autograds_silu_times_up_bitwise_and_saves_two_tensors(dtype):
    g = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(64, 96, generator=g).to(dtype) for _ in range(3))
    results = []
    for fn in (lambda a, b: torch.nn.functional.silu(a) * b, blocks.swiglu):
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
    assert blocks.recompute_swiglu(model) == 2
    assert blocks.recompute_swiglu(model) == 0  # once
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
    assert blocks.recompute_swiglu(model) == 0 and type(model[0]) is OtherMLP


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_weight", [False, True])
def test_rmsnorm_forward_is_llamas_bitwise_and_its_gradients_match_autograds(dtype, train_weight):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(1)
    norm = LlamaRMSNorm(96, eps=1e-5)
    norm.weight.data = torch.rand(96, generator=g) + 0.5
    norm.weight.requires_grad_(train_weight)
    x0, grad = (
        torch.randn(3, 40, 96, generator=g).to(dtype) * 3,
        torch.randn(3, 40, 96, generator=g).to(dtype),
    )
    results = []
    for fused in (False, True):
        module = copy.deepcopy(norm)
        if fused:
            assert blocks.fuse_rmsnorm(module) == 1
        x = x0.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = module(x)
        out.backward(grad)
        results.append((out.detach(), x.grad, module.weight.grad, sum(t.numel() for t in saved)))
    (out0, gx0, gw0, n0), (out1, gx1, gw1, n1) = results
    assert torch.equal(out0, out1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol * gx0.abs().max().item())
    assert (gw0 is None) == (gw1 is None) == (not train_weight)
    if train_weight:
        torch.testing.assert_close(gw1, gw0, rtol=1e-5, atol=1e-5 * gw0.abs().max().item())
    assert n1 < n0  # x and rstd (and the weight) instead of x-sized intermediates


def test_llama_rmsnorms_are_fused_once_and_a_model_trains_as_before():
    reference, model = build_model(90, seed=5, layers=2), build_model(90, seed=5, layers=2)
    keys = list(model.state_dict())
    assert blocks.fuse_rmsnorm(model) == 5  # two per layer and the final norm
    assert blocks.fuse_rmsnorm(model) == 0
    assert type(model.model.norm).__name__ == "FusedLlamaRMSNorm" and list(model.state_dict()) == keys
    ids = torch.randint(3, 90, (2, 17), generator=torch.Generator().manual_seed(6))
    losses = []
    for m in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])  # the forward is bitwise
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # evaluation runs the original forward
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    restored = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert type(restored.model.norm) is type(model.model.norm)


def test_an_rmsnorm_with_another_forward_is_left_alone():
    class OffsetRMSNorm(nn.Module):  # Gemma's form: (1 + weight)
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.zeros(4)), 1e-6

        def forward(self, x):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return x * (1.0 + self.weight)

    model = nn.Sequential(OffsetRMSNorm())
    assert blocks.fuse_rmsnorm(model) == 0 and type(model[0]) is OffsetRMSNorm
