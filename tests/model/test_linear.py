"""Planned matmuls and the planned linear layers (model/linear.py): never a different number."""

from __future__ import annotations

import pytest
import torch

from sftlab.model import linear


@pytest.fixture(autouse=True)
def fresh_plans(monkeypatch):
    monkeypatch.setattr(linear, "_PLANS", {})
    monkeypatch.setattr(linear, "_EXACT", {})
    monkeypatch.setattr(linear, "PLANNED_MACS", 1)
    monkeypatch.setattr(linear, "PLANNED_ROWS", 1)


def _operands(rows=200, inner=96, cols=160, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, inner, generator=g).to(dtype), torch.randn(cols, inner, generator=g).to(
        dtype
    ).t()


def test_the_column_cut_computes_the_product():
    a, b = _operands()
    torch.testing.assert_close(
        linear.CANDIDATES["columns"](a, b).float(), (a.float() @ b.float()), rtol=2e-2, atol=0.1
    )


def test_a_cut_that_changes_bits_is_never_chosen_however_fast(monkeypatch):
    a, b = _operands()
    monkeypatch.setattr(linear, "_median_time", lambda product, a, b: 1.0 if product is torch.mm else 0.0)
    monkeypatch.setitem(linear.CANDIDATES, "columns", lambda a, b: torch.mm(a, b) + 1)
    assert linear.choose(a, b) == "plain"
    monkeypatch.setitem(linear.CANDIDATES, "columns", linear._columns)
    assert linear.choose(a, b) == "columns"  # bitwise the plain call here, and "faster"


def test_a_cut_must_be_ten_percent_faster(monkeypatch):
    a, b = _operands()
    monkeypatch.setattr(linear, "_median_time", lambda product, a, b: 1.0 if product is torch.mm else 0.95)
    assert linear.choose(a, b) == "plain"


def test_each_exact_shape_checks_its_classs_cut_and_falls_back_to_plain(monkeypatch):
    a, b = _operands(rows=200)
    monkeypatch.setattr(linear, "_median_time", lambda product, a, b: 1.0 if product is torch.mm else 0.0)
    assert torch.equal(linear.mm(a, b), torch.mm(a, b))
    (plan,) = linear.plans().values()
    assert plan != "plain"
    # another row count of the same class where the cut would differ from the plain call: plain is used
    monkeypatch.setitem(linear.CANDIDATES, plan, lambda a, b: torch.mm(a, b) + 1)
    c, d = _operands(rows=180, seed=1)
    assert torch.equal(linear.mm(c, d), torch.mm(c, d))
    assert linear._EXACT[linear._key(c, d, 180)] == "plain"


def test_small_products_and_differentiable_calls_take_plain_mm(monkeypatch):
    monkeypatch.setattr(linear, "PLANNED_MACS", 1 << 40)
    a, b = _operands()
    linear.mm(a, b)
    assert linear.plans() == {}
    monkeypatch.setattr(linear, "PLANNED_MACS", 1)
    a.requires_grad_(True)
    (linear.mm(a, b).float().sum()).backward()  # a cut writes into an output: not differentiable
    assert linear.plans() == {} and a.grad is not None


def test_a_lora_product_planned_with_cuts_trains_bitwise_as_with_plain_products(monkeypatch):
    from sftlab.model.adapters import _LoraProduct

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(160, 96, generator=g).to(torch.bfloat16)
    down, up = (torch.randn(*s, generator=g).mul(0.1).to(torch.bfloat16) for s in ((8, 96), (160, 8)))
    source = torch.randn(200, 96, generator=g)

    def run():
        x, a, b = source.clone().requires_grad_(), down.clone().requires_grad_(), up.clone().requires_grad_()
        out = _LoraProduct.apply(x * 1.0, weight, None, a, b, 2.0)
        out.float().square().sum().backward()
        return out, x.grad, a.grad, b.grad

    monkeypatch.setattr(linear, "PLANNED_MACS", 1 << 62)
    plain = run()
    monkeypatch.setattr(linear, "PLANNED_MACS", 1)
    monkeypatch.setattr(linear, "_median_time", lambda product, a, b: 1.0 if product is torch.mm else 0.0)
    planned = run()
    assert set(linear.plans().values()) - {"plain"}  # a cut was taken (forward and input gradient)
    assert all(torch.equal(p, q) for p, q in zip(plain, planned))
