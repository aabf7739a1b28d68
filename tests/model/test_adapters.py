"""LoRA settings brought from other tools: rsLoRA, trained biases, target_modules as a regular expression."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from sftlab.config.schema import PeftSettings
from sftlab.model import adapters, linear


def _lora_layers(wrapped):
    return {n: m for n, m in wrapped.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_a_regex_targets_exactly_the_matching_full_names(tiny_model):
    pattern = r".*layers\.0\.self_attn\.(q|v)_proj"
    wrapped, line = adapters.wrap(tiny_model, PeftSettings(r=2, target_modules=pattern))
    names = sorted(n.rsplit("model.", 1)[-1] for n in _lora_layers(wrapped))
    assert names == ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"], names
    assert pattern in line


def test_a_regex_matching_nothing_is_refused_with_the_layer_names(tiny_model):
    with pytest.raises(adapters.AdapterError, match=r"matches no linear layer.*q_proj"):
        adapters.wrap(tiny_model, PeftSettings(r=2, target_modules=r".*nothing_here"))


def test_an_invalid_regex_is_a_config_error():
    with pytest.raises(ValueError, match=r"target_modules\s+Value error, not a valid regular expression"):
        PeftSettings(target_modules="(unclosed")


def test_rslora_scales_by_alpha_over_sqrt_r(tiny_model):
    wrapped, line = adapters.wrap(tiny_model, PeftSettings(r=4, alpha=8.0, use_rslora=True))
    scale = next(iter(_lora_layers(wrapped).values())).scaling["default"]
    assert scale == pytest.approx(8.0 / math.sqrt(4)) and scale != pytest.approx(8.0 / 4)
    assert "rsLoRA" in line


def test_bias_all_trains_every_bias_and_none_trains_none():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
    )
    trained = {}
    for bias in ("none", "all"):
        wrapped, _ = adapters.wrap(LlamaForCausalLM(cfg), PeftSettings(r=2, bias=bias))
        trained[bias] = [n for n, p in wrapped.named_parameters() if p.requires_grad and n.endswith(".bias")]
    assert trained["none"] == [] and len(trained["all"]) >= 4


def test_settings_of_a_saved_adapter_keep_the_new_settings(tiny_model):
    wrapped, _ = adapters.wrap(
        tiny_model, PeftSettings(r=2, target_modules=r".*q_proj", use_rslora=True, bias="all")
    )
    settings = adapters.settings_of(wrapped.peft_config["default"])
    assert (settings.target_modules, settings.use_rslora, settings.bias) == (r".*q_proj", True, "all")


def _lora_pair(dropout: float = 0.0):
    """Two copies of one LoRA model with nonzero lora_B (a fresh adapter's product is zero): peft's, fused."""
    import copy

    from conftest import build_model

    torch.manual_seed(0)
    plain, _ = adapters.wrap(build_model(80, seed=2), PeftSettings(r=4, alpha=8.0, dropout=dropout))
    for name, p in plain.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(plain)
    assert adapters.fuse_lora_forward(fused) == len(_lora_layers(fused)) > 0
    return plain, fused


@pytest.mark.parametrize("autocast", [False, True])
def test_the_fused_lora_forward_equals_peft(autocast):
    """Outputs and the gradients of the adapters and of the input equal peft's forward: within 1e-5 in fp32;
    under bf16 autocast within bf16 rounding (peft rounds the adapter product, its scaled copy and the sum)."""
    plain, fused = _lora_pair()
    ids = torch.randint(3, 80, (2, 9))
    grads = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids).logits.float()
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["logits"] = out.detach()
    assert set(grads[0]) == set(grads[1]) and any("lora_A" in n for n in grads[0])
    tol = {"rtol": 3e-2, "atol": 3e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **tol, msg=name)


def test_the_fused_lora_forward_falls_back_to_peft_where_it_does_not_apply():
    """Disabled or merged adapters, and dropout, run as peft does (the same random numbers: the same mask)."""
    plain, fused = _lora_pair(dropout=0.3)
    ids = torch.randint(3, 80, (1, 7))
    for model in (plain, fused):
        model.train()
    torch.manual_seed(5)
    want = plain(input_ids=ids).logits
    torch.manual_seed(5)
    torch.testing.assert_close(fused(input_ids=ids).logits, want, rtol=1e-5, atol=1e-6)
    with plain.disable_adapter(), fused.disable_adapter():
        torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    plain.eval(), fused.eval()
    plain.merge_adapter(), fused.merge_adapter()
    torch.testing.assert_close(fused(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("scaling", [2.0, 0.7])
def test_the_lora_product_differentiates_as_autograd_does(with_bias, scaling):
    """`_LoraProduct` (the fused forward without dropout): output and the gradients of the input and the
    adapter equal autograd's through x W^T + b + s (x A^T) B^T, within float32 summation order; the frozen
    base gets none; the input gradient is skipped when the input needs none."""
    torch.manual_seed(0)
    x = torch.randn(13, 10, requires_grad=True)
    weight, bias = torch.randn(7, 10), (torch.randn(7) if with_bias else None)
    down, up = torch.randn(3, 10, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    grad = torch.randn(13, 7)
    want = torch.nn.functional.linear(x, weight, bias) + scaling * (x @ down.t()) @ up.t()
    expected = torch.autograd.grad(want, (x, down, up), grad)
    got = adapters._LoraProduct.apply(x, weight, bias, down, up, scaling)
    torch.testing.assert_close(got, want)
    for g, e in zip(torch.autograd.grad(got, (x, down, up), grad), expected):
        torch.testing.assert_close(g, e)
    frozen_input = x.detach()
    out = adapters._LoraProduct.apply(frozen_input, weight, bias, down, up, scaling)
    (g_down,) = torch.autograd.grad(out, (down,), grad)
    torch.testing.assert_close(g_down, expected[1])


def test_a_power_of_two_scaling_gives_the_bits_of_a_prescaled_lora_b():
    """alpha / r = 2 applied inside the sums computes, in bf16, what the product with lora_B scaled first
    (peft's order) computes: the output and every gradient bitwise."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(40, 16, generator=g)
    weight = torch.randn(24, 16, generator=g).bfloat16()
    down0, up0 = (torch.randn(*s, generator=g).bfloat16() for s in ((4, 16), (24, 4)))
    grad = torch.randn(40, 24, generator=g).bfloat16()

    def run(prescaled):
        x, down, up = (t.clone().requires_grad_() for t in (x0, down0, up0))
        if prescaled:
            out = adapters._LoraProduct.apply(x, weight, None, down, up * 2.0, 1.0)
        else:
            out = adapters._LoraProduct.apply(x, weight, None, down, up, 2.0)
        out.backward(grad)
        return out, x.grad, down.grad, up.grad

    assert all(torch.equal(a, b) for a, b in zip(run(True), run(False)))


def test_layers_reading_one_input_share_its_cast_and_train_bitwise_as_with_their_own(monkeypatch):
    """Under bf16 autocast q, k and v (gate and up) read one fp32 normed hidden state: its bf16 copy is made
    and saved for backward once, not once per layer, and the loss and every gradient are bitwise those of a
    copy per layer (the input gradients still meet at the fp32 input, summed there as before)."""
    _, fused = _lora_pair()
    ids = torch.randint(3, 80, (2, 9), generator=torch.Generator().manual_seed(1))

    def run():
        fused.zero_grad()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = fused(input_ids=ids).logits.float().square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in fused.named_parameters() if p.grad is not None}
        storages = {
            t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.bfloat16 and t.ndim == 2
        }
        return loss.detach(), grads, len(storages)

    shared = run()
    monkeypatch.setattr(linear, "shared_cast", lambda x, dtype: x.to(dtype))
    own = run()
    assert torch.equal(shared[0], own[0]) and shared[1].keys() == own[1].keys()
    assert all(torch.equal(shared[1][n], own[1][n]) for n in own[1])
    layers = fused.base_model.model.model.layers
    assert own[2] - shared[2] >= 3 * len(layers)  # q/k/v: 2 copies fewer, gate/up: 1 fewer, per layer


needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes (sftlab[qlora])"
)


def _qlora_pair(path, dropout: float = 0.0):
    """Two loads of one nf4 LoRA model (64 wide: bitsandbytes' CPU blocks) with nonzero lora_B: peft's, fused."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(vocab_size=96, num_key_value_heads=2, **shape)).save_pretrained(path)
    settings = PeftSettings(r=4, alpha=8.0, dropout=dropout, quantize="nf4")
    pair = []
    for _ in range(2):
        torch.manual_seed(1)
        base = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, quantization_config=adapters.quantization_config(settings)
        )
        model, _ = adapters.wrap(base, settings)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        pair.append(model)
    assert adapters.fuse_lora_forward(pair[1]) == len(_lora_layers(pair[1])) == 14
    return pair


@needs_bitsandbytes
def test_the_fused_4bit_lora_forward_equals_peft_under_bf16_autocast(tmp_path):
    """QLoRA (nf4 base) under bf16 autocast: logits and every adapter gradient equal peft + bitsandbytes'
    within bf16 rounding (bitsandbytes returns each base product to fp32; the fused layer keeps bf16, as
    autocast does a linear layer's), so the gradient reaches the first layer's adapters through the base."""
    plain, fused = _qlora_pair(tmp_path / "m")
    ids = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for model in (plain, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids).logits.float()
        out.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        grads[-1]["logits"] = out.detach()
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 2 * 14 + 1
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=3e-2, atol=3e-2, msg=name)


@needs_bitsandbytes
def test_a_fused_4bit_layer_is_the_product_on_its_dequantized_weight_and_keeps_no_copy(tmp_path):
    """One fused nf4 layer computes `_LoraProduct` on the weight bitsandbytes dequantizes (its base product
    is bitsandbytes' own, bit for bit), with the same input and adapter gradients, and saves no weight-sized
    tensor for the backward (the weight is dequantized again there: QLoRA's memory)."""
    from bitsandbytes.functional import dequantize_4bit

    _, fused = _qlora_pair(tmp_path / "m")
    layer = fused.base_model.model.model.layers[0].mlp.up_proj
    weight = dequantize_4bit(layer.base_layer.weight, layer.base_layer.weight.quant_state).bfloat16()
    x0 = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    xb = x0.reshape(-1, 64).bfloat16()
    assert torch.equal(layer.base_layer(xb), torch.nn.functional.linear(xb, weight))
    down, up = (m["default"].weight for m in (layer.lora_A, layer.lora_B))

    x = x0.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
    got.float().sum().backward()
    assert got.dtype == torch.bfloat16 and weight.shape not in saved
    x_ref = x0.clone().requires_grad_()
    down_ref, up_ref = (t.detach().bfloat16().requires_grad_() for t in (down, up))
    want = adapters._LoraProduct.apply(x_ref.reshape(-1, 64), weight, None, down_ref, up_ref, 2.0)
    want.float().sum().backward()
    assert torch.equal(got.reshape(-1, got.shape[-1]), want)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(down.grad, down_ref.grad.float()) and torch.equal(up.grad, up_ref.grad.float())


@needs_bitsandbytes
@pytest.mark.parametrize("case", ["fp32", "dropout"])
def test_a_4bit_layer_runs_peft_without_autocast_or_with_dropout(case, tmp_path):
    """Without autocast (bitsandbytes computes in its compute dtype, not the input's) and with dropout the
    4-bit layers run peft + bitsandbytes' forward: the same logits as an unfused model, to the bit."""
    plain, fused = _qlora_pair(tmp_path / "m", dropout=0.3 if case == "dropout" else 0.0)
    ids = torch.randint(3, 96, (1, 9), generator=torch.Generator().manual_seed(4))
    logits = []
    for model in (plain, fused):
        model.train()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "dropout"):
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
